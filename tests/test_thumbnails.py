"""Thumbnails of every collection format: right kind and size (decoded, not guessed), bounded, never half-made."""

import io
import os
import resource
import signal
import struct
import subprocess
import threading
import time
import zlib

import exifread
import pytest

from conftest import IMAGEMAGICK, make_image, wait_for, with_exif


def decoded(data, tmp_path, fields='%m %w %h %[colorspace] %z %A %n'):
    """ImageMagick's reading of image bytes: format, size, colorspace, depth, alpha, frames."""
    path = tmp_path / 'probe'
    path.write_bytes(data)
    out = subprocess.run([IMAGEMAGICK, str(path), '-format', fields + '\n', 'info:'], check=True,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()[0].split()
    return out[0], int(out[1]), int(out[2]), *out[3:]


def pixel(data, tmp_path, x, y):
    """The colour of one pixel, as ImageMagick names it (e.g. srgb(255,255,255))."""
    path = tmp_path / 'pixel'
    path.write_bytes(data)
    return subprocess.run([IMAGEMAGICK, str(path) + '[0]', '-format', f'%[pixel:p{{{x},{y}}}]', 'info:'],
                          check=True, capture_output=True, text=True, timeout=60).stdout


def pdf(tmp_path, postscript):
    """A PDF made by Ghostscript from a PostScript program (ImageMagick may not write PDFs)."""
    (tmp_path / 'in.ps').write_text(postscript)
    subprocess.run(['gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=pdfwrite', '-o',
                    str(tmp_path / 'out.pdf'), str(tmp_path / 'in.ps')], check=True, timeout=60)
    return (tmp_path / 'out.pdf').read_bytes()


TWO_PAGES = ('%!PS\n<< /PageSize [200 300] >> setpagedevice\n'
             '1 0 0 setrgbcolor 50 50 100 100 rectfill showpage\n'
             '0 0 1 setrgbcolor 0 0 200 300 rectfill showpage\n')


def thumbnail(client, name, data, scale=123, **expect):
    client.upload(name, data)
    return client.fileget(name, 'T', scale=str(scale), **expect)


# --- Formats ---------------------------------------------------------------------------

def test_jpeg_thumbnail_is_a_jpeg_bounded_by_the_scale(client, tmp_path):
    answer = thumbnail(client, 'photo.jpg', make_image(tmp_path, 'plasma:', '1200x800', 'jpg'))
    assert answer.content_type == 'image/jpeg'
    assert decoded(answer.body, tmp_path)[:3] == ('JPEG', 123, 82)


def test_png_thumbnail_keeps_its_transparency(client, tmp_path):
    original = make_image(tmp_path, 'xc:none', '400x200', 'png', '-fill', 'red', '-draw', 'circle 200,100 200,10')
    answer = thumbnail(client, 'label.png', original)
    kind, width, height, _space, _depth, alpha, _frames = decoded(answer.body, tmp_path)
    assert (answer.content_type, kind, width, height, alpha) == ('image/png', 'PNG', 123, 62, 'True')
    assert pixel(answer.body, tmp_path, 0, 0).endswith(',0)')          # a corner stays transparent


def test_gif_thumbnail_is_its_first_frame_as_a_gif(client, tmp_path):
    original = make_image(tmp_path, 'xc:red', '300x300', 'gif', '-size', '300x300', 'xc:blue', '-loop', '0')
    answer = thumbnail(client, 'anim.gif', original)
    kind, width, height, *_rest, frames = decoded(answer.body, tmp_path)
    assert (answer.content_type, kind, width, height, frames) == ('image/gif', 'GIF', 123, 123, '1')
    assert pixel(answer.body, tmp_path, 60, 60) in ('srgb(255,0,0)', 'red')


def test_multipage_tiff_thumbnail_is_its_first_page_as_png(client, tmp_path):
    original = make_image(tmp_path, 'xc:red', '600x400', 'tif', '-size', '600x400', 'xc:green',
                          '-size', '600x400', 'xc:blue')
    answer = thumbnail(client, 'scan.tif', original)
    assert answer.content_type == 'image/png'
    assert decoded(answer.body, tmp_path)[:3] == ('PNG', 123, 82)
    assert pixel(answer.body, tmp_path, 60, 40) in ('srgb(255,0,0)', 'red')
    assert client.stored('thumbnails/scan_123.tif') == answer.body


@pytest.mark.parametrize('spec, extra', [('plasma:', ['-colorspace', 'CMYK']), ('gradient:', ['-depth', '16'])])
def test_cmyk_and_16_bit_tiffs_come_out_as_8_bit_srgb_png(client, tmp_path, spec, extra):
    original = make_image(tmp_path, spec, '300x200', 'tif', *extra)
    answer = thumbnail(client, 'scan.tiff', original)
    kind, width, height, space, depth, *_ = decoded(answer.body, tmp_path)
    assert (kind, width, height, depth) == ('PNG', 123, 82, '8')
    assert space in ('sRGB', 'Gray')


def test_pdf_thumbnail_is_its_first_page_on_white_as_png(client, tmp_path):
    answer = thumbnail(client, 'notebook.pdf', pdf(tmp_path, TWO_PAGES))
    kind, width, height, *_rest = decoded(answer.body, tmp_path)
    assert (answer.content_type, kind, max(width, height)) == ('image/png', 'PNG', 123)
    assert (width, height) == (82, 123)
    assert pixel(answer.body, tmp_path, 2, 2) in ('srgb(255,255,255)', 'white')     # white page, not blue
    assert pixel(answer.body, tmp_path, 41, 82) in ('srgb(255,0,0)', 'red')         # the red square


def test_pdf_thumbnails_do_not_need_imagemagicks_pdf_coder(client, tmp_path, monkeypatch):
    calls = []
    real = client.app.thumbnailer._run

    def spy(program, *args, **limits):
        calls.append(args)
        return real(program, *args, **limits)
    monkeypatch.setattr(client.app.thumbnailer, '_run', spy)
    thumbnail(client, 'notebook.pdf', pdf(tmp_path, TWO_PAGES))
    ghostscript = calls[:-1]
    assert ghostscript and all('-dSAFER' in args for args in ghostscript)
    assert '-dLastPage=1' in ghostscript[-1]
    assert not any(str(arg).lower().startswith(('pdf:', 'ps:', 'eps:')) for args in calls for arg in args)


def test_heic_thumbnail_is_a_png(client, tmp_path):
    source = tmp_path / 'phone.jpg'
    source.write_bytes(make_image(tmp_path, 'plasma:', '800x600', 'jpg'))
    subprocess.run(['heif-enc', '-q', '40', str(source), '-o', str(tmp_path / 'phone.heic')],
                   check=True, capture_output=True, timeout=120)
    answer = thumbnail(client, 'IMG_0001.HEIC', (tmp_path / 'phone.heic').read_bytes())
    assert answer.content_type == 'image/png'
    assert decoded(answer.body, tmp_path)[:3] == ('PNG', 123, 92)


def test_kind_is_told_from_the_bytes_not_the_extension(client, tmp_path):
    answer = thumbnail(client, 'actually-a-png.jpg', make_image(tmp_path, 'plasma:', '300x200', 'png'))
    assert (answer.content_type, decoded(answer.body, tmp_path)[0]) == ('image/png', 'PNG')


# --- Correctness -------------------------------------------------------------------------

def test_exif_orientation_is_applied(client, tmp_path):
    landscape = make_image(tmp_path, 'plasma:', '300x200', 'jpg')
    answer = thumbnail(client, 'sideways.jpg', with_exif(landscape, orientation=6))
    assert decoded(answer.body, tmp_path)[1:3] == (82, 123)


def test_thumbnails_carry_no_metadata(client, tmp_path):
    original = with_exif(make_image(tmp_path, 'plasma:', '300x200', 'jpg'), date='2020:01:01 00:00:00')
    answer = thumbnail(client, 'tagged.jpg', original)
    assert exifread.process_file(io.BytesIO(answer.body), details=False) == {}


@pytest.mark.parametrize('fmt', ['jpg', 'png', 'gif', 'tif'])
@pytest.mark.parametrize('scale', [123, 256])
def test_small_images_are_never_upscaled(client, tmp_path, fmt, scale):
    answer = thumbnail(client, f'small.{fmt}', make_image(tmp_path, 'plasma:', '50x40', fmt), scale)
    assert decoded(answer.body, tmp_path)[1:3] == (50, 40)


@pytest.mark.parametrize('size, scale, expected', [('5000x300', 123, (123, 7)), ('100x4000', 500, (13, 500)),
                                                   ('250x240', 123, (123, 118))])
def test_the_longer_side_is_the_scale_whatever_the_shape(client, tmp_path, size, scale, expected):
    answer = thumbnail(client, 'shape.jpg', make_image(tmp_path, 'gradient:', size, 'jpg'), scale)
    assert decoded(answer.body, tmp_path)[1:3] == expected


# --- Refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize('name, data', [
    ('disguised.jpg', b'%!PS-Adobe-3.0\n/Times findfont 12 scalefont setfont 72 72 moveto (x) show showpage\n'),
    ('vector.jpg', b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ('script.jpg', b'<?xml version="1.0"?><image><read filename="/etc/passwd"/></image>'),
    ('empty.jpg', b''),
    ('truncated.jpg', b'\xff\xd8\xff\xe0\x00\x10JFIF\x00'),
])
def test_disguised_broken_or_foreign_files_get_no_thumbnail(client, tmp_path, name, data):
    answer = thumbnail(client, name, data, status=404)
    assert answer.content_type == 'text/plain'
    assert client.all_files() == {f'originals/{name}'}


def png_claiming(width, height):
    """A PNG header declaring a huge image, as a decompression bomb does."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    chunk = b'IHDR' + ihdr
    return (b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + chunk + struct.pack('>I', zlib.crc32(chunk))
            + struct.pack('>I', 0) + b'IDAT' + struct.pack('>I', zlib.crc32(b'IDAT')))


def test_a_decompression_bomb_is_refused_at_once(client):
    started = time.time()
    answer = thumbnail(client, 'bomb.png', png_claiming(100_000, 100_000), status=404)
    assert 'too many pixels' in answer.text
    assert time.time() - started < 2


def test_an_image_over_the_pixel_setting_is_refused(make_client, tmp_path):
    client = make_client(THUMBNAIL_MAX_PIXELS=10_000)
    thumbnail(client, 'big.jpg', make_image(tmp_path, 'plasma:', '200x100', 'jpg'), status=404)


# --- Bounds: time, concurrency, crashes ----------------------------------------------------

def slow_tiff(side=7000):
    """A grey TIFF, side x side, to be turned a quarter (Orientation 6): seconds of ImageMagick work in 200 kB."""
    packer = zlib.compressobj(1)
    strip = b''.join(packer.compress(bytes([128]) * side) for _ in range(side)) + packer.flush()
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 8 + 2 + 10 * 12 + 4),
            (274, 3, 6), (277, 3, 1), (278, 4, side), (279, 4, len(strip))]
    directory = struct.pack('<H', len(tags)) + b''.join(
        struct.pack('<HHI', tag, kind, 1) + struct.pack('<H' if kind == 3 else '<I', value).ljust(4, b'\0')
        for tag, kind, value in tags) + struct.pack('<I', 0)
    return b'II*\0' + struct.pack('<I', 8) + directory + strip


def stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name (read as bytes: a name need not be UTF-8)."""
    with open(f'/proc/{pid}/stat', 'rb') as stat:
        return stat.read().rsplit(b')', 1)[1].decode('ascii').split()


def parent_of(pid):
    return int(stat_fields(pid)[1])


def conversions():
    """Pids of the ImageMagick processes this test process (the in-process server) has running."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            if parent_of(entry) == os.getpid() and \
                    os.path.realpath(f'/proc/{entry}/exe') == os.path.realpath(IMAGEMAGICK):
                found.append(int(entry))
        except OSError:                # it ended meanwhile
            pass
    return found


def is_running(pid):
    """True while `pid` is a live (not reaped, not zombie) process."""
    try:
        return stat_fields(pid)[0] != 'Z'
    except OSError:
        return False


class Watching:
    """Records the pids of every conversion the server runs while the block runs."""

    def __enter__(self):
        self.pids, self.running = set(), True
        self.thread = threading.Thread(target=self._watch)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.pids.update(conversions())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def test_a_conversion_over_the_time_limit_is_killed_and_the_next_request_succeeds(make_client, jpeg):
    client = make_client(THUMBNAIL_TIMEOUT=1)
    client.upload('sheet.tif', slow_tiff())
    started = time.time()
    with Watching() as watched:
        answer = client.fileget('sheet.tif', 'T', scale='123', status=404)
    assert answer.text == 'Making the thumbnail took too long.'
    assert time.time() - started < 4
    assert len(watched.pids) == 1 and not any(is_running(pid) for pid in watched.pids)
    assert client.all_files() == {'originals/sheet.tif'}
    assert client.leftovers() == []
    client.upload('a.jpg', jpeg)
    assert client.fileget('a.jpg', 'T', scale='123').content_type == 'image/jpeg'


def test_a_conversion_killed_midway_leaves_nothing_cached(client, tmp_path):
    client.upload('sheet.tif', slow_tiff())
    answers = []
    request = threading.Thread(target=lambda: answers.append(client.fileget('sheet.tif', 'T', scale='123', status=404)))
    request.start()
    try:
        assert wait_for(conversions, 30)
        victim = conversions()[0]
        os.kill(victim, signal.SIGKILL)        # as the kernel's out-of-memory killer would
    finally:
        request.join(60)
    assert answers[0].text == 'This file could not be thumbnailed.'
    assert not is_running(victim)
    assert client.all_files() == {'originals/sheet.tif'}
    assert client.leftovers() == []
    assert decoded(client.fileget('sheet.tif', 'T', scale='123').body, tmp_path)[:3] == ('PNG', 123, 123)


def gate_conversions(thumbnailer):
    """Hold every conversion at its start until the test opens the gate; count calls and the most at once."""
    seen = {'calls': 0, 'running': 0, 'most': 0, 'gate': threading.Event()}
    lock = threading.Lock()
    real = thumbnailer._convert

    def gated(*args):
        with lock:
            seen['calls'] += 1
            seen['running'] += 1
            seen['most'] = max(seen['most'], seen['running'])
        try:
            seen['gate'].wait(60)
            return real(*args)
        finally:
            with lock:
                seen['running'] -= 1
    thumbnailer._convert = gated
    return seen


class Arrivals:
    """Wraps a context-manager factory (a lock or semaphore) and counts who has tried to enter it."""

    def __init__(self, inner):
        self.inner, self.count, self.lock = inner, 0, threading.Lock()

    def __call__(self, *args):
        self._arrive()
        return self.inner(*args)

    def __enter__(self):
        self._arrive()
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def _arrive(self):
        with self.lock:
            self.count += 1


def in_threads(count, job):
    """Start `count` threads running job(i); returns (threads, results) to join later."""
    results = [None] * count

    def run(i):
        results[i] = job(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def joined(threads, results):
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_requests_for_one_new_thumbnail_share_one_conversion(client, tmp_path):
    client.upload('a.jpg', make_image(tmp_path, 'plasma:', '1000x800', 'jpg'))
    seen = gate_conversions(client.app.thumbnailer)
    arrivals = client.app.storage.thumbnail_locks = Arrivals(client.app.storage.thumbnail_locks)
    requests = in_threads(8, lambda i: client.fileget('a.jpg', 'T', scale='123').body)
    all_waiting = wait_for(lambda: arrivals.count == 8 and seen['running'] == 1, seconds=30)
    seen['gate'].set()
    bodies = joined(*requests)
    assert all_waiting, (arrivals.count, seen)          # all 8 at the conversion's lock, one converting
    assert seen['calls'] == 1
    assert len(set(bodies)) == 1 and decoded(bodies[0], tmp_path)[1:3] == (123, 98)


def test_no_more_than_thumbnail_workers_conversions_run_at_once(make_client, jpeg):
    client = make_client(THUMBNAIL_WORKERS=2)
    for i in range(6):
        client.upload(f'{i}.jpg', jpeg)
    seen = gate_conversions(client.app.thumbnailer)
    slots = client.app.thumbnailer.slots = Arrivals(client.app.thumbnailer.slots)
    requests = in_threads(6, lambda i: client.fileget(f'{i}.jpg', 'T', scale='100').status_int)
    all_arrived = wait_for(lambda: slots.count == 6 and seen['running'] == 2, seconds=30)
    most_while_held = seen['most']
    seen['gate'].set()
    statuses = joined(*requests)
    assert all_arrived, (slots.count, seen)            # six asked for a slot while two conversions were held
    assert most_while_held == 2
    assert statuses == [200] * 6
    assert (seen['calls'], seen['most']) == (6, 2)


def test_a_thumbnail_made_from_replaced_bytes_is_not_kept(client, jpeg, png, tmp_path):
    client.upload('a.jpg', jpeg)
    real = client.app.thumbnailer._convert
    replaced = []

    def convert_then_replace(*args):
        real(*args)
        if not replaced:
            replaced.append(client.upload('a.jpg', png).text)    # new bytes land mid-conversion
    client.app.thumbnailer._convert = convert_then_replace
    answer = client.fileget('a.jpg', 'T', scale='123')
    assert replaced == ['Ok.']
    assert decoded(answer.body, tmp_path)[:3] == ('PNG', 80, 60)


def test_upload_makes_the_default_thumbnail_in_the_background(make_client, jpeg):
    client = make_client(PREGENERATE_SCALE=123)
    client.upload('a.jpg', jpeg)
    assert wait_for(lambda: 'thumbnails/a_123.jpg' in client.all_files())


def test_upload_answers_without_waiting_for_the_background_thumbnail(make_client):
    client = make_client(PREGENERATE_SCALE=123)
    assert client.upload('sheet.tif', slow_tiff()).text == 'Ok.'
    assert 'thumbnails/sheet_123.tif' not in client.all_files()       # seconds of work still to do
    assert wait_for(lambda: 'thumbnails/sheet_123.tif' in client.all_files(), 60)


def test_postscript_that_mentions_pdf_is_not_given_to_ghostscript(client):
    started = time.time()
    thumbnail(client, 'p.pdf', b'%!PS\n% %PDF-1.4\n{ } loop\n', status=404)
    assert time.time() - started < 2


def test_thumbnails_work_under_a_low_hard_file_size_limit(make_client, jpeg, monkeypatch):
    real = resource.getrlimit
    monkeypatch.setattr('server.resource.getrlimit',
                        lambda which: (10 ** 6, 10 ** 6) if which == resource.RLIMIT_FSIZE else real(which))
    client = make_client()
    assert client.app.thumbnailer.disk_limit == 10 ** 6
    assert thumbnail(client, 'a.jpg', jpeg).status_int == 200
