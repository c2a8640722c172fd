"""IIIF answers from a pyramid: built by libvips once per original, stored with the thumbnails, tiles and sizes
info.json offers cached and answered with validators, everything dropped when the original is replaced or
deleted, and a corrupt original tried once."""

import json
import os
import signal
import time

import pytest

from harness.images import make_image, with_exif
from test_iiif_service import near
from test_thumbnails import TWO_PAGES, decoded, pdf, pixel
from engines.children import ChildPool
from engines.imagemagick import ImageMagick
from errors import ThumbnailError

BASE = 'http://assets.example.org:8080'


@pytest.fixture(scope='module')
def sheet(tmp_path_factory):
    """A 1200x900 JPEG: three zoom levels of 512 px tiles."""
    return make_image(tmp_path_factory.mktemp('sheet'), 'plasma:', '1200x900', 'jpg')


@pytest.fixture
def runs(monkeypatch):
    """The jobs the engine ran ('build', 'cut') and the other tools' runs (their program's name)."""
    seen = []
    run_tool, run_job = ImageMagick.run, ChildPool.run

    def tool(self, program, *args, **kwargs):
        seen.append((str(program).rsplit('/', 1)[-1], 'tool'))
        return run_tool(self, program, *args, **kwargs)

    def job(self, name, *args, **kwargs):
        seen.append(('engine', name))
        return run_job(self, name, *args, **kwargs)
    monkeypatch.setattr(ImageMagick, 'run', tool)
    monkeypatch.setattr(ChildPool, 'run', job)
    return seen


def derivatives(client):
    return sorted(path.split('/')[-1] for path in client.all_files() if '/thumbnails/' in '/' + path)


def test_the_first_view_builds_the_pyramid_once_and_stores_it_with_the_thumbnails(client, sheet, runs):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/info.json', {})
    client.get('/iiif/2/sheet.jpg/info.json', {})
    assert len([run for run in runs if run[1] == 'build']) == 1
    assert derivatives(client) == ['sheet_iiif.jpg']
    assert client.stored('thumbnails/sheet_iiif.jpg')[:4] in (b'II*\0', b'II+\0')


def test_an_offered_tile_is_cut_once_then_answered_from_the_cache(client, sheet, runs):
    client.upload('sheet.jpg', sheet)
    first = client.get('/iiif/3/sheet.jpg/512,0,512,512/512,512/0/default.jpg', {})
    cuts = [run for run in runs if run[1] == 'cut']
    second = client.get('/iiif/3/sheet.jpg/512,0,512,512/512,512/0/default.jpg', {})
    assert len(cuts) == 1 and [run for run in runs if run[1] == 'cut'] == cuts
    assert first.body == second.body and first.content_type == 'image/jpeg'
    assert 'sheet_iiif,512,0,512,512,512,512.jpg' in derivatives(client)


def test_a_cached_tile_is_answered_with_no_tool_run_at_all(client, sheet, runs):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,1024,900/512,450/0/default.jpg', {})
    runs.clear()
    client.get('/iiif/3/sheet.jpg/0,0,1024,900/512,450/0/default.jpg', {})
    assert runs == []


def test_a_2_1_tile_request_shares_the_3_0_cached_answer(client, sheet, runs):
    client.upload('sheet.jpg', sheet)
    three = client.get('/iiif/3/sheet.jpg/1024,512,176,388/176,388/0/default.jpg', {}).body
    runs.clear()
    two = client.get('/iiif/2/sheet.jpg/1024,512,176,388/176,/0/default.jpg', {}).body
    assert three == two and runs == []


def test_a_cached_tile_has_a_strong_etag_and_a_304_for_it(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/full/300,225/0/default.jpg', {})
    answer = client.get('/iiif/3/sheet.jpg/full/300,225/0/default.jpg', {})
    assert answer.headers['ETag'].startswith('"') and 'Last-Modified' in answer.headers
    assert answer.headers['Cache-Control'] == 'public, max-age=86400'
    again = client.get('/iiif/3/sheet.jpg/full/300,225/0/default.jpg', {},
                       headers={'If-None-Match': answer.headers['ETag']}, status=304)
    assert again.body == b''


def test_with_the_key_required_answers_are_kept_out_of_shared_caches(make_client, sheet):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('sheet.jpg', sheet)
    answer = client.get('/iiif/3/sheet.jpg/full/300,225/0/default.jpg', {'token': client.token('sheet.jpg')})
    assert answer.headers['Cache-Control'] == 'private, max-age=3600'


@pytest.mark.parametrize('request_path', ['0,0,100,100/100,100/0/default.jpg', 'full/300,225/90/default.jpg',
                                          'full/300,225/!0/default.jpg', 'full/300,225/0/gray.jpg',
                                          'full/300,225/0/default.png', 'full/301,226/0/default.jpg'])
def test_an_answer_info_json_does_not_offer_is_cut_but_not_stored(client, sheet, request_path):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/' + request_path, {})
    assert derivatives(client) == ['sheet_iiif.jpg']


def test_a_tile_is_cut_from_the_pyramid_where_the_image_has_those_pixels(client, tmp_path):
    client.upload('halves.png', make_image(tmp_path, 'xc:red', '1200x900', 'png',
                                           '-fill', 'blue', '-draw', 'rectangle 600,0 1199,899'))
    tile = client.get('/iiif/3/halves.png/512,0,512,512/512,512/0/default.png', {}).body
    assert (near(tile, tmp_path, 70, 100), near(tile, tmp_path, 110, 100)) == ('red', 'blue')
    quarter = client.get('/iiif/3/halves.png/0,0,1024,900/256,225/0/default.png', {}).body
    assert decoded(quarter, tmp_path)[1:3] == (256, 225)
    assert (near(quarter, tmp_path, 140, 100), near(quarter, tmp_path, 160, 100)) == ('red', 'blue')


def test_replacing_the_original_drops_its_pyramid_and_tiles(client, sheet, tmp_path):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,512,512/512,512/0/default.jpg', {})
    client.upload('sheet.jpg', make_image(tmp_path, 'xc:green', '600x400', 'jpg'))
    assert derivatives(client) == []
    info = json.loads(client.get('/iiif/3/sheet.jpg/info.json', {}).body)
    assert (info['width'], info['height']) == (600, 400)


def test_deleting_the_original_removes_its_pyramid_and_tiles(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,512,512/512,512/0/default.jpg', {})
    client.delete('sheet.jpg')
    assert derivatives(client) == []
    client.get('/iiif/3/sheet.jpg/info.json', {}, status=404)


def corrupt(jpeg):
    """A JPEG's first marker, then bytes no decoder can read."""
    return jpeg[:4] + bytes(range(256)) * 64


def test_a_corrupt_original_is_refused_cleanly_and_not_tried_again_for_every_tile(client, sheet, runs):
    client.upload('broken.jpg', corrupt(sheet))
    first = client.get('/iiif/3/broken.jpg/info.json', {}, status=404)
    tried = len(runs)
    client.get('/iiif/3/broken.jpg/0,0,512,512/512,512/0/default.jpg', {}, status=404)
    client.get('/iiif/3/broken.jpg/info.json', {}, status=404)
    assert tried >= 1 and len(runs) == tried
    assert first.content_type.startswith('text/plain') and 'Traceback' not in first.text


def test_an_upload_forgets_the_failure_of_the_bytes_it_replaced(client, sheet):
    client.upload('sheet.jpg', corrupt(sheet))
    client.get('/iiif/3/sheet.jpg/info.json', {}, status=404)
    client.upload('sheet.jpg', sheet)
    assert json.loads(client.get('/iiif/3/sheet.jpg/info.json', {}).body)['width'] == 1200


def test_the_exif_orientation_is_applied_in_the_pyramid(client, tmp_path):
    client.upload('turned.jpg', with_exif(make_image(tmp_path, 'plasma:', '600x400', 'jpg'), orientation=6))
    info = json.loads(client.get('/iiif/3/turned.jpg/info.json', {}).body)
    tile = client.get('/iiif/3/turned.jpg/0,0,400,512/200,256/0/default.jpg', {}).body
    assert (info['width'], info['height']) == (400, 600) and decoded(tile, tmp_path)[1:3] == (200, 256)


def test_a_pdf_is_viewed_as_its_first_page_4096_pixels_long(client, tmp_path):
    client.upload('notes.pdf', pdf(tmp_path, TWO_PAGES))
    info = json.loads(client.get('/iiif/3/notes.pdf/info.json', {}).body)
    assert max(info['width'], info['height']) == 4096
    page = client.get('/iiif/3/notes.pdf/full/200,/0/default.png', {}).body
    assert decoded(page, tmp_path)[:2] == ('PNG', 200)


def test_a_heic_photo_is_viewed_through_imagemagick(client, tmp_path):
    photo = make_image(tmp_path, 'plasma:', '640x480', 'heic')
    client.upload('phone.heic', photo)
    info = json.loads(client.get('/iiif/3/phone.heic/info.json', {}).body)
    assert (info['width'], info['height']) == (640, 480)
    assert decoded(client.get('/iiif/3/phone.heic/full/max/0/default.jpg', {}).body, tmp_path)[1:3] == (640, 480)


def test_the_cache_listing_counts_pyramids_and_tiles_as_the_originals_derivatives(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,512,512/512,512/0/default.jpg', {})
    listed = sorted(name for name, _size, _modified in client.app.storage.derivatives(None))
    assert listed == ['sheet_iiif,0,0,512,512,512,512.jpg', 'sheet_iiif.jpg']
    assert all(size > 0 for _name, size, _modified in client.app.storage.derivatives(None))


# --- The engine's children ----------------------------------------------------------------------

def engine_pids(client):
    return [child.pid for child in client.app.vips.children.idle]


def test_an_engine_child_stays_for_the_next_job(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,100,100/100,100/0/default.jpg', {})
    kept = engine_pids(client)
    client.get('/iiif/3/sheet.jpg/0,0,200,100/100,50/0/default.jpg', {})
    assert len(kept) == 1 and engine_pids(client) == kept


def test_a_child_gone_while_idle_is_replaced_by_a_new_one(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,100,100/100,100/0/default.jpg', {})
    [gone] = client.app.vips.children.idle
    os.kill(gone.pid, signal.SIGKILL)
    gone.wait()
    client.get('/iiif/3/sheet.jpg/0,0,200,100/100,50/0/default.jpg', {})
    assert engine_pids(client) not in ([], [gone.pid])


def test_a_child_that_does_not_answer_in_time_is_killed_and_the_request_refused(client, sheet):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,100,100/100,100/0/default.jpg', {})
    [stuck] = client.app.vips.children.idle
    os.kill(stuck.pid, signal.SIGSTOP)
    client.app.vips.timeout = 1
    answer = client.get('/iiif/3/sheet.jpg/0,0,200,100/100,50/0/default.jpg', {}, status=404)
    assert 'too long' in answer.text and stuck.poll() == -signal.SIGKILL
    assert engine_pids(client) == []


def test_a_job_the_engine_cannot_do_ends_its_child_with_a_clean_error(client):
    with pytest.raises(ThumbnailError):
        client.app.vips.run_job('cut', ['missing.tif', 'out', '{}'], str(client.path()), time.monotonic() + 30)
    assert client.app.vips.children.idle == []


# --- On S3 --------------------------------------------------------------------------------------

@pytest.mark.s3_only
def test_on_s3_the_pyramid_is_fetched_once_for_the_answers_cut_from_it(client, sheet, monkeypatch):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/info.json', {})
    fetched = []
    download = client.app.storage.client.download_file
    monkeypatch.setattr(client.app.storage.client, 'download_file',
                        lambda bucket, key, *args, **kwargs: fetched.append(key) or download(bucket, key, *args,
                                                                                             **kwargs))
    for x in (0, 100, 200):
        client.get(f'/iiif/3/sheet.jpg/{x},0,100,100/100,100/0/default.jpg', {})
    assert [key.rsplit('/', 1)[-1] for key in fetched] == ['sheet_iiif.jpg']


@pytest.mark.s3_only
def test_on_s3_a_replaced_pyramid_is_fetched_again(client, sheet, tmp_path):
    client.upload('sheet.jpg', sheet)
    client.get('/iiif/3/sheet.jpg/0,0,100,100/100,100/0/default.png', {})
    client.upload('sheet.jpg', make_image(tmp_path, 'xc:blue', '1200x900', 'jpg'))
    tile = client.get('/iiif/3/sheet.jpg/0,0,100,100/100,100/0/default.png', {}).body
    assert pixel(tile, tmp_path, 50, 50) in ('srgb(0,0,255)', 'srgb(0,0,254)', 'srgb(1,0,254)')
