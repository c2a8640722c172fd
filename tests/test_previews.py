"""Previews for galleries: which thumbnails stay cached, WebP for browsers, and uploads' pregeneration
never standing in a waiting client's way."""

import contextlib
import os
import threading

import pytest

import server
from harness.images import make_image
from harness.processes import wait_for
from test_thumbnails import decoded
from cache import CacheSize, DerivativeCache
from config import ConfigError, load_config
from engines.scheduling import BACKGROUND, INTERACTIVE
from names import TEMP_PREFIX
from storages.disk import DiskStorage

CHROME_IMAGE_ACCEPT = 'image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8'
JAVA_ACCEPT = 'text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2'     # what Specify 6's HttpURLConnection sends


def cached_thumbnails(client):
    """The cache names of every thumbnail stored, on disk or in the bucket."""
    storage = client.app.storage
    if hasattr(storage, 'bucket'):
        prefix = storage.key([client.config.THUMB_DIR]) + '/'
        listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix).get('Contents', [])
        return sorted(item['Key'][len(prefix):] for item in listed)
    folder = os.path.join(client.config.BASE_DIR, client.config.THUMB_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(name for name in names if not name.startswith(TEMP_PREFIX))


def preview(client, name, scale, accept=None):
    return client.fileget(name, 'T', scale=str(scale), headers={'Accept': accept} if accept else None)


# --- The cache keeps the configured scales and a few others per original -------------------------

def test_many_scales_of_one_image_leave_only_the_configured_and_the_last_three_cached(make_client, jpeg, tmp_path):
    client = make_client(PREGENERATE_SCALE=[200], THUMBNAIL_OTHER_SCALES=3)
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: cached_thumbnails(client) == ['a_200.jpg'], 60)
    widths = [decoded(preview(client, 'a.jpg', scale).body, tmp_path)[1] for scale in range(50, 60)]
    assert widths == list(range(50, 60))                        # every answer exact
    assert cached_thumbnails(client) == ['a_200.jpg', 'a_57.jpg', 'a_58.jpg', 'a_59.jpg']


def test_with_one_other_scale_kept_each_new_scale_replaces_the_last(make_client, jpeg, tmp_path):
    client = make_client(PREGENERATE_SCALE=[200], THUMBNAIL_OTHER_SCALES=1)
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: cached_thumbnails(client) == ['a_200.jpg'], 60)
    assert decoded(preview(client, 'a.jpg', 64).body, tmp_path)[1:3] == (64, 43)
    assert decoded(preview(client, 'a.jpg', 65).body, tmp_path)[1:3] == (65, 43)
    assert cached_thumbnails(client) == ['a_200.jpg', 'a_65.jpg']


def test_one_image_asked_at_many_scales_does_not_push_out_another_images_other_scale(make_client, jpeg):
    client = make_client(THUMBNAIL_OTHER_SCALES=2, THUMBNAIL_OTHER_SCALES_ORIGINALS=2)
    client.upload('a.jpg', jpeg)
    client.upload('b.jpg', jpeg)
    preview(client, 'a.jpg', 150)
    for scale in range(20, 40):
        preview(client, 'b.jpg', scale)
    assert cached_thumbnails(client) == ['a_150.jpg', 'b_38.jpg', 'b_39.jpg']


def test_beyond_the_originals_followed_the_least_recently_added_to_loses_its_other_scales(make_client, jpeg):
    client = make_client(THUMBNAIL_OTHER_SCALES=2, THUMBNAIL_OTHER_SCALES_ORIGINALS=2)
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        client.upload(name, jpeg)
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        preview(client, name, 100)
    assert cached_thumbnails(client) == ['b_100.jpg', 'c_100.jpg']


def test_a_kept_other_scale_asked_again_is_served_from_the_cache(make_client, jpeg):
    client = make_client(THUMBNAIL_OTHER_SCALES=3)
    client.upload('a.jpg', jpeg)
    first = preview(client, 'a.jpg', 77).body
    conversions = counted_conversions(client.app.imagemagick)
    assert preview(client, 'a.jpg', 77).body == first and conversions == []


@pytest.mark.parametrize('setting, value', [('THUMBNAIL_OTHER_SCALES', 0), ('THUMBNAIL_OTHER_SCALES', 'many'),
                                            ('THUMBNAIL_OTHER_SCALES_ORIGINALS', 0)])
def test_other_scale_settings_out_of_range_are_refused_at_start(setting, value, tmp_path):
    with pytest.raises(ConfigError, match=setting):
        load_config({'BASE_DIR': str(tmp_path), setting: value}, environ={})


def cached_bytes(client):
    return sum(size for *_, size, _modified in client.app.cache.cached_derivatives())


def test_a_sweep_over_the_size_bound_removes_other_scales_before_configured_ones_down_to_90_percent(
        make_client, tmp_path):
    client = make_client(PREGENERATE_SCALE=[300], THUMBNAIL_OTHER_SCALES=5)
    for name in ('a.jpg', 'b.jpg'):
        client.upload(name, make_image(tmp_path, 'plasma:', '600x400', 'jpg'))
        preview(client, name, 300)
    configured = cached_bytes(client)
    for scale in (250, 260, 270):
        preview(client, 'a.jpg', scale)
    storage = client.app.cache
    storage.cache_size = CacheSize(bound=configured * 10 // 9 + 1, spare_newer_than=0)
    storage.sweep_cache()
    assert cached_thumbnails(client) == ['a_300.jpg', 'b_300.jpg']
    assert storage.cache_size.total == configured


def test_a_sweep_removes_the_least_recently_made_first_other_scales_before_configured_ones(tmp_path):
    config = load_config({'BASE_DIR': str(tmp_path), 'PREGENERATE_SCALE': [300]}, environ={})
    storage = DerivativeCache(config, DiskStorage(config), None, None, None)
    listing = [(None, 'new_300.jpg', 40, 3000.0), (None, 'old_300.jpg', 40, 1000.0), (None, 'mid_300.jpg', 40, 2000.0),
               (None, 'newest_64.jpg', 10, 9000.0)]
    storage.cached_derivatives = lambda: iter(listing)
    storage.cache_size = CacheSize(bound=100)
    removed = []
    storage.storage.remove_derivative = lambda coll, cache_name: removed.append(cache_name)
    storage.sweep_cache()                   # 130 bytes, 90 to be left: 40 to go
    assert (sorted(removed), storage.cache_size.total) == (['newest_64.jpg', 'old_300.jpg'], 80)


def test_storing_a_thumbnail_over_the_size_bound_starts_a_sweep_that_spares_the_one_just_made(make_client, jpeg):
    client = make_client(THUMBNAIL_CACHE_MAX_BYTES=10 ** 9, THUMBNAIL_OTHER_SCALES=5)
    storage = client.app.cache
    client.upload('a.jpg', jpeg)
    client.upload('b.jpg', jpeg)
    assert wait_for(lambda: storage.cache_size.total == 0, 30)                  # the count at start
    preview(client, 'b.jpg', 100)          # the older, removed (on S3 the same second: then the name decides)
    storage.cache_size.spare_newer_than = 0
    newer = preview(client, 'a.jpg', 99)
    new_size = len(newer.body)
    storage.cache_size.bound = new_size * 10 // 9 + 1      # both are over it; a_99 alone is within 90%
    storage.cache_size.sweep_every = 0
    storage.cache_size.total = None                          # counted again by the sweep
    storage.start_cache_sweep()
    assert wait_for(lambda: cached_thumbnails(client) == ['a_99.jpg'], 30)


def test_a_sweep_never_removes_a_thumbnail_made_in_its_last_minute(make_client, jpeg):
    client = make_client(THUMBNAIL_OTHER_SCALES=5)
    client.upload('a.jpg', jpeg)
    preview(client, 'a.jpg', 100)
    storage = client.app.cache
    storage.cache_size = CacheSize(bound=1)
    storage.sweep_cache()
    assert cached_thumbnails(client) == ['a_100.jpg'] and storage.cache_size.total > 1


def test_sweeps_start_at_most_once_a_sweep_interval():
    size = CacheSize(bound=100, sweep_every=60)
    first = size.sweep_due()
    size.swept(500)
    assert (first, size.sweep_due(added=10), size.total) == (True, False, 510)


def test_by_default_a_sweep_keeps_the_cache_within_the_bytes_the_originals_hold(make_client, tmp_path):
    client = make_client(PREGENERATE_SCALE=[300], THUMBNAIL_OTHER_SCALES=5)
    original = make_image(tmp_path, 'plasma:', '600x400', 'jpg')
    client.upload('a.jpg', original)
    for scale in (300, 250, 260, 270, 280, 290):
        preview(client, 'a.jpg', scale)
    storage = client.app.cache
    assert cached_bytes(client) > len(original)
    storage.cache_size.spare_newer_than = 0
    storage.sweep_cache()
    assert storage.cache_size.bound == len(original) and cached_bytes(client) <= len(original) * 9 // 10
    assert 'a_300.jpg' in cached_thumbnails(client)


def test_a_share_of_no_originals_counted_removes_nothing(make_client, jpeg):
    client = make_client(THUMBNAIL_OTHER_SCALES=5)
    client.upload('a.jpg', jpeg)
    preview(client, 'a.jpg', 100)
    storage = client.app.cache
    storage.storage.originals_bytes = lambda coll: 0          # the originals' folder not mounted, say
    storage.cache_size.spare_newer_than = 0
    storage.sweep_cache()
    assert cached_thumbnails(client) == ['a_100.jpg'] and storage.cache_size.bound is None


@pytest.mark.parametrize('value, bound', [('100%', (None, 1.0)), ('250%', (None, 2.5)), ('5000', (5000, None)),
                                          (5000, (5000, None)), (None, (None, None))])
def test_the_size_bound_is_bytes_or_a_share_of_the_originals_bytes(value, bound, tmp_path):
    config = load_config({'BASE_DIR': str(tmp_path), 'THUMBNAIL_CACHE_MAX_BYTES': value}, environ={})
    assert config.THUMBNAIL_CACHE_BOUND == bound


@pytest.mark.parametrize('value', [0, -5, 'big', True, '0%', '5.5%', '%'])
def test_a_size_bound_that_is_not_a_positive_number_of_bytes_is_refused_at_start(value, tmp_path):
    with pytest.raises(ConfigError, match='THUMBNAIL_CACHE_MAX_BYTES'):
        load_config({'BASE_DIR': str(tmp_path), 'THUMBNAIL_CACHE_MAX_BYTES': value}, environ={})


def counted_conversions(thumbnailer):
    """The scales a thumbnailer converts, in order."""
    scales = []
    real = thumbnailer.converted

    def counting(source, scale, *args, **kwargs):
        scales.append(scale)
        return real(source, scale, *args, **kwargs)
    thumbnailer.converted = counting
    return scales


# --- WebP for browsers that ask for it ----------------------------------------------------------

def test_a_browser_accepting_webp_gets_a_webp_preview_of_the_exact_size_and_vary(client, jpeg, tmp_path):
    client.upload('a.jpg', jpeg)
    answer = preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    assert (answer.content_type, answer.headers['Vary']) == ('image/webp', 'Accept')
    assert decoded(answer.body, tmp_path)[:3] == ('WEBP', 123, 82)


@pytest.mark.parametrize('accept', [JAVA_ACCEPT, None, 'image/webp;q=0, image/jpeg', 'image/*', '*/*'])
def test_a_client_not_naming_webp_gets_the_jpeg_as_before_with_vary_accept(client, jpeg, accept, tmp_path):
    client.upload('a.jpg', jpeg)
    answer = preview(client, 'a.jpg', 123, accept)
    assert (answer.content_type, answer.headers['Vary']) == ('image/jpeg', 'Accept')
    assert decoded(answer.body, tmp_path)[:3] == ('JPEG', 123, 82)


@pytest.mark.parametrize('accept, webp', [('image/webp', True), ('IMAGE/WEBP;q=0.5', True), ('image/webp;q=0', False),
                                          ('image/webp; q=0.000', False), ('image/webpx', False),
                                          ('text/html,image/webp;q=0.001', True), ('', False)])
def test_accept_names_webp_only_with_its_own_media_type_and_a_quality_above_zero(accept, webp):
    assert server.accepts_webp(accept) is webp


def test_the_webp_and_the_jpeg_preview_are_cached_separately(client, jpeg):
    client.upload('a.jpg', jpeg)
    webp_answer = preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT).body
    jpeg_answer = preview(client, 'a.jpg', 123, JAVA_ACCEPT).body
    conversions = counted_conversions(client.app.imagemagick)
    again = (preview(client, 'a.jpg', 123, JAVA_ACCEPT).body, preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT).body)
    assert again == (jpeg_answer, webp_answer) and conversions == []
    assert cached_thumbnails(client) == ['a_123.jpg', 'a_123_webp.jpg']


def test_a_browser_is_answered_the_pregenerated_jpeg_without_a_conversion_while_no_webp_is_cached(make_client, jpeg):
    client = make_client(PREGENERATE_SCALE=[123])
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: cached_thumbnails(client) == ['a_123.jpg'], 60)
    pregenerated = preview(client, 'a.jpg', 123, JAVA_ACCEPT).body
    converting = []
    real = client.app.imagemagick.converted
    client.app.imagemagick.converted = lambda *args, **kwargs: (
        converting.append(threading.current_thread().name) or real(*args, **kwargs))
    answer = preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    assert (answer.content_type, answer.headers['Vary'], answer.body) == ('image/jpeg', 'Accept', pregenerated)
    assert set(converting) <= {'thumbnail-pregeneration'}     # the WebP is made in the background, not in this request


def test_the_webp_of_a_pregenerated_thumbnail_is_made_in_the_background_and_answered_once_made(
        make_client, jpeg, tmp_path):
    client = make_client(PREGENERATE_SCALE=[123])
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: cached_thumbnails(client) == ['a_123.jpg'], 60)
    assert preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT).content_type == 'image/jpeg'
    assert wait_for(lambda: cached_thumbnails(client) == ['a_123.jpg', 'a_123_webp.jpg'], 60)
    answer = preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    assert (answer.content_type, decoded(answer.body, tmp_path)[:3]) == ('image/webp', ('WEBP', 123, 82))


def test_many_views_before_the_webp_exists_queue_its_making_once(make_client, jpeg):
    client = make_client(PREGENERATE_SCALE=[123])
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: cached_thumbnails(client) == ['a_123.jpg'], 60)
    thumbnailer = client.app.scheduler
    held = threading.Event()
    thumbnailer.in_background(lambda: held.wait(30))      # the background is busy meanwhile
    for _ in range(20):
        preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    waiting = [key for key, _job in list(thumbnailer.backlog.queue)]
    held.set()
    assert waiting == [('Fish', 'a.jpg', 123, True)]


def test_a_png_with_transparency_keeps_it_as_webp(client, tmp_path):
    png = make_image(tmp_path, 'xc:none', '400x300', 'png', '-fill', 'red', '-draw', 'circle 200,150 200,50')
    client.upload('label.png', png)
    answer = preview(client, 'label.png', 100, CHROME_IMAGE_ACCEPT)
    kind, width, height, _colorspace, _depth, alpha = decoded(answer.body, tmp_path)[:6]
    assert (answer.content_type, kind, width, height, alpha) == ('image/webp', 'WEBP', 100, 75, 'True')


def test_a_gif_stays_a_gif_for_a_browser_accepting_webp(client, tmp_path):
    client.upload('map.gif', make_image(tmp_path, 'plasma:', '300x200', 'gif'))
    answer = preview(client, 'map.gif', 100, CHROME_IMAGE_ACCEPT)
    assert (answer.content_type, decoded(answer.body, tmp_path)[0]) == ('image/gif', 'GIF')


def test_replacing_an_original_gives_a_webp_preview_of_the_new_bytes(client, jpeg, tmp_path):
    client.upload('a.jpg', jpeg)
    preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    client.upload('a.jpg', make_image(tmp_path, 'plasma:', '200x400', 'jpg'))
    assert decoded(preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT).body, tmp_path)[1:3] == (62, 123)


def test_deleting_an_original_removes_its_webp_preview(client, jpeg):
    client.upload('a.jpg', jpeg)
    preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    client.upload('ab.jpg', jpeg)
    preview(client, 'ab.jpg', 123, CHROME_IMAGE_ACCEPT)
    client.delete('a.jpg')
    assert cached_thumbnails(client) == ['ab_123_webp.jpg']


def test_an_original_is_sent_as_stored_whatever_the_accept_header(client, jpeg):
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg', 'O', headers={'Accept': CHROME_IMAGE_ACCEPT})
    assert (answer.body, answer.content_type, 'Vary' in answer.headers) == (jpeg, 'image/jpeg', False)


def test_with_webp_off_a_browser_gets_the_jpeg_and_no_vary(make_client, jpeg):
    client = make_client(WEBP_THUMBNAILS=False)
    client.upload('a.jpg', jpeg)
    answer = preview(client, 'a.jpg', 123, CHROME_IMAGE_ACCEPT)
    assert (answer.content_type, 'Vary' in answer.headers) == ('image/jpeg', False)


# --- Pregeneration behind waiting clients --------------------------------------------------------

class SlotLog:
    """The conversion slots, logging the class of work of each conversion as it starts, its first one held."""

    def __init__(self, slots):
        self.slots, self.started, self.gate = slots, [], threading.Event()
        self.first_held = threading.Event()

    @contextlib.contextmanager
    def __call__(self, work):
        with self.slots(work):
            self.started.append(work)
            if len(self.started) == 1:
                self.first_held.set()
                self.gate.wait(60)
            yield

    def __getattr__(self, name):
        return getattr(self.slots, name)


def test_after_a_burst_of_500_uploads_a_waiting_client_waits_for_at_most_one_conversion(make_client, jpeg):
    client = make_client(PREGENERATE_SCALE=[1000, 123], THUMBNAIL_WORKERS=1)
    thumbnailer = client.app.scheduler
    log = thumbnailer.slots = SlotLog(thumbnailer.slots)
    try:
        for number in range(500):
            client.upload(f'upload-{number}.jpg', jpeg)
        assert log.first_held.wait(60)
        waiting = threading.Thread(target=lambda: preview(client, 'upload-499.jpg', 64))
        waiting.start()
        assert wait_for(lambda: log.slots.waiting[INTERACTIVE] == 1, 30)
        log.gate.set()
        waiting.join(60)
    finally:
        log.gate.set()
        with thumbnailer.backlog.mutex:
            thumbnailer.backlog.queue.clear()
    assert log.started[:2] == [BACKGROUND, INTERACTIVE]


def test_a_background_job_failing_unexpectedly_does_not_stop_the_jobs_after_it(make_client):
    thumbnailer = make_client().app.scheduler
    later_job_ran = threading.Event()

    def failing():
        raise RuntimeError('a fault no storage error class names')
    thumbnailer.in_background(failing)
    thumbnailer.in_background(lambda: later_job_ran.set())
    assert later_job_ran.wait(30)
