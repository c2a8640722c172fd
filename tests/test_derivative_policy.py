"""The derivative policy, on disk, through HTTP: a cached thumbnail, pyramid or IIIF answer is used while it is
not older than its original (to the nanosecond) and made again once it is; a smaller thumbnail is made from the
smallest fresh cached thumbnail of a configured larger scale (the ladder), else from the original; pregenerated
scales are made largest first; replacing or deleting an original drops its derivatives and the failures
remembered for it.

Cached files are planted in the upstream layout (thumbnails/<root>_<scale><ext>, <root>_iiif<ext> for the
pyramid, <root>_iiif,x,y,w,h,W,H<ext> for an IIIF answer), marked so that an answer shows where it came from:
a thumbnail's colour names its source."""

import contextlib
import json
import os
import threading

import pytest

from harness.images import make_image
from harness.processes import wait_for
from test_iiif_pyramids import runs  # noqa: F401 (a fixture)
from test_thumbnails import decoded, pixel, run_counter

pytestmark = pytest.mark.disk_only
COLOURS = {'red': (255, 0, 0), 'green': (0, 128, 0), 'blue': (0, 0, 255)}


class Solid(dict):
    """Solid PNGs by colour and size, each made on first use: images[('blue', '400x300')]."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, key):
        colour, size = key
        self[key] = make_image(self.folder, f'xc:{colour}', size, 'png')
        return self[key]


@pytest.fixture(scope='session')
def images(tmp_path_factory):
    return Solid(tmp_path_factory.mktemp('solid'))


def colour_of(data, tmp_path):
    """The name of the colour of an image's pixel (1, 1), within 16 of each component (JPEG and WebP are lossy)."""
    named = pixel(data, tmp_path, 1, 1).strip()
    found = COLOURS[named] if named in COLOURS else tuple(int(float(n)) for n in named[5:-1].split(',')[:3])
    return next((name for name, rgb in COLOURS.items() if all(abs(a - b) <= 16 for a, b in zip(found, rgb))), named)


def plant(client, cache_name, data, age_ns=0, original='a.png', folder=''):
    """A cached derivative in the thumbnails folder (of a collection `folder`), modified `age_ns` nanoseconds
    before (negative: after) its original."""
    path = client.path(folder, 'thumbnails', cache_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    modified = os.stat(client.path(folder, 'originals', original)).st_mtime_ns - age_ns
    os.utime(path, ns=(modified, modified))


def ladder(make_client, scales, **settings):
    """A client whose configured scales are `scales`, none made in the background (the test plants them)."""
    client = make_client(PREGENERATE_SCALE=scales, **settings)
    client.app.scheduler.in_background = lambda job, key=None: None
    return client


def thumbnail_colour(client, tmp_path, scale, name='a.png'):
    return colour_of(client.fileget(name, 'T', scale=str(scale)).body, tmp_path)


# --- Freshness -------------------------------------------------------------------------------------------

def test_a_cached_thumbnail_modified_with_its_original_to_the_nanosecond_is_answered_as_cached(client, images):
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_100.png', b'cached bytes', age_ns=0)
    assert client.fileget('a.png', 'T', scale='100').body == b'cached bytes'


def test_a_cached_thumbnail_modified_after_its_original_is_answered_as_cached(client, images):
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_100.png', b'cached bytes', age_ns=-10 ** 9)
    assert client.fileget('a.png', 'T', scale='100').body == b'cached bytes'


def test_a_cached_thumbnail_a_nanosecond_older_than_its_original_is_made_again(client, images, tmp_path):
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_100.png', images[('red', '100x75')], age_ns=1)
    assert thumbnail_colour(client, tmp_path, 100) == 'blue'
    assert colour_of(client.stored('thumbnails/a_100.png'), tmp_path) == 'blue'


def test_the_thumbnail_of_a_missing_original_is_404_though_one_is_cached(client, images):
    os.makedirs(client.path('thumbnails'))
    with open(client.path('thumbnails', 'a_100.png'), 'wb') as f:
        f.write(images[('red', '100x75')])
    assert client.fileget('a.png', 'T', scale='100', status=404).text == 'No such file.'


def builds(runs):
    return len([run for run in runs if run == ('engine', 'build')])


def test_a_pyramid_modified_with_its_original_to_the_nanosecond_is_cut_from_as_stored(client, images, runs):
    client.upload('a.png', images[('blue', '400x300')])
    client.web.get('/iiif/3/a.png/info.json')
    plant(client, 'a_iiif.png', client.stored('thumbnails/a_iiif.png'), age_ns=0)
    client.web.get('/iiif/3/a.png/0,0,200,200/100,100/0/default.jpg')
    assert builds(runs) == 1


def test_a_pyramid_a_nanosecond_older_than_its_original_is_built_again_before_it_is_cut_from(client, images, runs):
    client.upload('a.png', images[('blue', '400x300')])
    client.web.get('/iiif/3/a.png/info.json')
    plant(client, 'a_iiif.png', client.stored('thumbnails/a_iiif.png'), age_ns=1)
    client.web.get('/iiif/3/a.png/0,0,200,200/100,100/0/default.jpg')
    assert builds(runs) == 2


def test_a_pyramid_stored_before_a_restart_serves_its_image_after_it(make_client, images, runs):
    before = make_client()
    before.upload('a.png', images[('blue', '400x300')])
    before.web.get('/iiif/3/a.png/info.json')
    after = make_client()                               # the same attachments folder, a new server
    assert json.loads(after.web.get('/iiif/3/a.png/info.json').body)['width'] == 400
    assert builds(runs) == 1


FULL = 'a_iiif,0,0,400,300,400,300.png'          # the cache name of a.png's full/max answer


def test_a_cached_iiif_answer_not_older_than_its_original_is_answered_as_cached(client, images):
    client.upload('a.png', images[('blue', '400x300')])
    client.web.get('/iiif/3/a.png/info.json')
    plant(client, FULL, b'cached answer', age_ns=0)
    assert client.web.get('/iiif/3/a.png/full/max/0/default.jpg').body == b'cached answer'


def test_a_cached_iiif_answer_older_than_its_original_is_cut_again(client, images, tmp_path):
    client.upload('a.png', images[('blue', '400x300')])
    client.web.get('/iiif/3/a.png/info.json')
    plant(client, FULL, images[('red', '400x300')], age_ns=1)
    answer = client.web.get('/iiif/3/a.png/full/max/0/default.jpg')
    assert decoded(answer.body, tmp_path)[:3] == ('JPEG', 400, 300)
    assert colour_of(answer.body, tmp_path) != 'red'


# --- The ladder --------------------------------------------------------------------------------------------

def test_a_smaller_thumbnail_is_made_from_the_smallest_fresh_cached_larger_configured_scale(make_client, images,
                                                                                           tmp_path):
    client = ladder(make_client, [200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200.png', images[('red', '200x150')])
    plant(client, 'a_100.png', images[('green', '100x75')])
    assert thumbnail_colour(client, tmp_path, 50) == 'green'


def test_in_a_collection_folder_a_smaller_thumbnail_is_made_from_the_collections_cached_larger_scale(
        make_client, images, tmp_path):
    client = ladder(make_client, [200], COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200.png', images[('red', '200x150')], folder='fish')
    assert thumbnail_colour(client, tmp_path, 50) == 'red'


def test_a_stale_cached_larger_scale_is_passed_over_for_the_next_larger(make_client, images, tmp_path):
    client = ladder(make_client, [200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200.png', images[('red', '200x150')])
    plant(client, 'a_100.png', images[('green', '100x75')], age_ns=1)
    assert thumbnail_colour(client, tmp_path, 50) == 'red'


def test_with_no_fresh_cached_larger_scale_a_thumbnail_is_made_from_the_original(make_client, images, tmp_path):
    client = ladder(make_client, [200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200.png', images[('red', '200x150')], age_ns=1)
    assert thumbnail_colour(client, tmp_path, 50) == 'blue'


def test_a_cached_thumbnail_of_a_scale_not_configured_is_no_source(make_client, images, tmp_path):
    client = ladder(make_client, [200])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_300.png', images[('red', '300x225')])
    assert thumbnail_colour(client, tmp_path, 50) == 'blue'


def test_a_thumbnail_is_never_made_from_a_cached_smaller_or_equal_scale(make_client, images, tmp_path):
    client = ladder(make_client, [200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_100.png', images[('green', '100x75')])
    assert thumbnail_colour(client, tmp_path, 150) == 'blue'


def test_a_webp_thumbnail_is_made_from_a_larger_scale_not_from_the_plain_one_of_its_own(make_client, images,
                                                                                      tmp_path):
    client = make_client(PREGENERATE_SCALE=[200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    assert wait_for(lambda: {'thumbnails/a_200.png', 'thumbnails/a_100.png'} <= client.all_files())
    plant(client, 'a_200.png', images[('red', '200x150')])
    plant(client, 'a_100.png', images[('green', '100x75')])
    answer = client.fileget('a.png', 'T', scale='100', headers={'Accept': 'image/webp'})
    assert colour_of(answer.body, tmp_path) == 'green'           # the plain one, while its WebP is made
    assert wait_for(lambda: 'thumbnails/a_100_webp.png' in client.all_files())
    assert colour_of(client.stored('thumbnails/a_100_webp.png'), tmp_path) == 'red'


def test_a_thumbnail_of_a_configured_scale_is_made_from_a_larger_configured_one(make_client, images, tmp_path):
    client = ladder(make_client, [200, 100])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200.png', images[('red', '200x150')])
    assert thumbnail_colour(client, tmp_path, 100) == 'red'


def test_a_cached_larger_scale_found_is_used_whatever_its_webp_namesake(make_client, images, tmp_path):
    client = ladder(make_client, [200])
    client.upload('a.png', images[('blue', '400x300')])
    plant(client, 'a_200_webp.png', images[('red', '200x150')])
    assert thumbnail_colour(client, tmp_path, 50) == 'blue'


# --- Pregenerated scales -----------------------------------------------------------------------------------

def test_pregenerated_scales_are_each_made_after_an_upload(make_client, images):
    client = make_client(PREGENERATE_SCALE=[64, 32])
    client.upload('a.png', images[('blue', '400x300')])
    assert wait_for(lambda: {'thumbnails/a_64.png', 'thumbnails/a_32.png'} <= client.all_files())


def test_pregenerated_scales_of_an_upload_to_a_collection_folder_are_made_there(make_client, images):
    client = make_client(PREGENERATE_SCALE=[64], COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.png', images[('blue', '400x300')])
    assert wait_for(lambda: 'fish/thumbnails/a_64.png' in client.all_files())


@pytest.mark.parametrize('setting, scales', [([32, 64, 32], [64, 32]), (64, [64]), (None, []), ([], [])])
def test_pregenerated_scales_are_made_largest_first_each_once(make_client, setting, scales):
    assert make_client(PREGENERATE_SCALE=setting).config.PREGENERATE_SCALES == scales


@pytest.mark.parametrize('setting', [0, 2001, [64, 0], [64, '32'], [True], 64.0])
def test_pregenerated_scales_out_of_range_are_refused_at_start(make_client, setting):
    with pytest.raises(Exception, match='PREGENERATE_SCALE must be scales from 1 to MAX_THUMBNAIL_SCALE'):
        make_client(PREGENERATE_SCALE=setting)


def test_the_largest_scale_allowed_may_be_pregenerated(make_client):
    assert make_client(PREGENERATE_SCALE=[1, 2000]).config.PREGENERATE_SCALES == [2000, 1]


# --- Made once, one at a time per thumbnail, never blocking another ---------------------------------------

def hold_first_conversion(imagemagick):
    """The first conversion waits at a gate until the test opens it: (an event set once it waits, the gate)."""
    waiting, gate, real = threading.Event(), threading.Event(), imagemagick._convert

    def convert(*args):
        if not waiting.is_set():
            waiting.set()
            gate.wait(60)
        return real(*args)
    imagemagick._convert = convert
    return waiting, gate


def test_a_cached_thumbnail_is_answered_while_every_conversion_admitted_is_taken(make_client, images):
    client = make_client(THUMBNAIL_WORKERS=1, THUMBNAIL_QUEUE=0)
    client.upload('a.png', images[('blue', '400x300')])
    client.upload('b.png', images[('blue', '400x300')])
    plant(client, 'a_100.png', b'cached bytes')
    waiting, gate = hold_first_conversion(client.app.imagemagick)
    held = threading.Thread(target=lambda: client.fileget('b.png', 'T', scale='100'))
    held.start()
    try:
        assert waiting.wait(30)
        assert client.fileget('a.png', 'T', scale='100').body == b'cached bytes'
    finally:
        gate.set()
        held.join(60)


THUMBNAILS = {                      # (collection, name, scale, Accept) of two thumbnails made at once
    'of another collection': (('Fish', 'a.png', '100', ''), ('Birds', 'a.png', '100', '')),
    'of another original': (('Fish', 'a.png', '100', ''), ('Fish', 'b.png', '100', '')),
    'of another scale': (('Fish', 'a.png', '100', ''), ('Fish', 'a.png', '50', '')),
    'in WebP': (('Fish', 'a.png', '100', ''), ('Fish', 'a.png', '100', 'image/webp')),
}


@pytest.mark.parametrize('case', THUMBNAILS)
def test_a_thumbnail_is_made_while_another_is_being_made(make_client, images, case):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Birds': 'birds'}, THUMBNAIL_QUEUE_WAIT=2)
    for coll in ('Fish', 'Birds'):
        for name in ('a.png', 'b.png'):
            client.upload(name, images[('blue', '400x300')], coll=coll)
    first, second = THUMBNAILS[case]
    waiting, gate = hold_first_conversion(client.app.imagemagick)

    def ask(coll, name, scale, accept):
        return client.fileget(name, 'T', scale=scale, coll=coll, headers={'Accept': accept} if accept else None)
    held = threading.Thread(target=ask, args=first)
    held.start()
    try:
        assert waiting.wait(30)
        assert ask(*second).status_int == 200              # not behind the first's turn
    finally:
        gate.set()
        held.join(60)


def test_an_original_replaced_during_every_conversion_is_refused_after_three_attempts(client, images):
    client.upload('a.png', images[('blue', '400x300')])
    real, made = client.app.imagemagick._convert, []

    def convert_then_replace(*args):
        real(*args)
        made.append(client.upload('a.png', images[('red' if len(made) % 2 else 'green', '400x300')]).text)
    client.app.imagemagick._convert = convert_then_replace
    answer = client.fileget('a.png', 'T', scale='100', status=404)
    assert (answer.text, made) == ('The file kept changing while its thumbnail was made.', ['Ok.'] * 3)


def test_the_failure_of_an_original_tried_after_a_cached_larger_scale_is_remembered(make_client, images):
    client = ladder(make_client, [200])
    truncated = images[('blue', '400x300')]
    client.upload('a.png', truncated[:len(truncated) // 2])
    plant(client, 'a_200.png', b'not an image')
    client.fileget('a.png', 'T', scale='100', status=404)
    runs_ = run_counter(client.app.imagemagick)
    client.fileget('a.png', 'T', scale='100', status=404)
    assert runs_ == []


# --- Names -------------------------------------------------------------------------------------------------

def test_a_thumbnail_whose_cache_name_is_255_bytes_is_made(client, images):
    name = 'x' * 247 + '.png'                       # its thumbnail's name has '_100' more
    client.upload(name, images[('blue', '400x300')])
    assert client.fileget(name, 'T', scale='100').status_int == 200


def test_a_thumbnail_whose_cache_name_would_be_256_bytes_is_refused_with_the_reason(client, images):
    name = 'x' * 248 + '.png'
    client.upload(name, images[('blue', '400x300')])
    assert client.fileget(name, 'T', scale='100', status=404).text == \
        'The file name is too long to name its thumbnail.'


def test_a_pyramid_whose_cache_name_would_be_256_bytes_is_refused_with_the_reason(client, images):
    name = 'x' * 247 + '.png'                       # its pyramid's name has '_iiif' more
    client.upload(name, images[('blue', '400x300')])
    assert client.get(f'/iiif/3/{name}/info.json', {}, status=404).text == \
        'The file name is too long to name its pyramid.'


@pytest.mark.parametrize('change', ['replaced', 'deleted'])
def test_a_pyramid_made_from_bytes_replaced_or_deleted_meanwhile_is_not_kept(client, images, change):
    client.upload('a.png', images[('blue', '400x300')])
    real = client.app.vips.pyramid_built

    @contextlib.contextmanager
    def built_then_changed(*args):
        with real(*args) as made:
            if change == 'replaced':
                client.upload('a.png', images[('red', '400x300')])
            else:
                client.delete('a.png')
            yield made
    client.app.vips.pyramid_built = built_then_changed
    answer = client.get('/iiif/3/a.png/info.json', {}, status=404)
    assert answer.text == 'The file changed while its pyramid was made: try again.'
    assert 'thumbnails/a_iiif.png' not in client.all_files()
