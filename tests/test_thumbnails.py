"""Thumbnails of every collection format: right kind and size (decoded, not guessed), bounded, never half-made."""

import contextlib
import functools
import hashlib
import io
import math
import os
import pathlib
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib

import exifread
import pytest

import iiif
from harness.images import IMAGEMAGICK, make_image, with_exif
from harness.processes import parent_pids, PROJECT, wait_for
from engines.scheduling import BACKGROUND, ConversionSlots, INTERACTIVE
from errors import ThumbnailsBusy
from kinds import TIFF_PAGES_READ, image_size, sniff_kind, tiff_pages
from storages.disk import SmallFiles


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
    real = client.app.imagemagick.run

    def spy(program, *args, **limits):
        calls.append(args)
        return real(program, *args, **limits)
    monkeypatch.setattr(client.app.imagemagick, "run", spy)
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



# --- Previews: decode no more than the output needs ---------------------------------------

@pytest.fixture(scope='session')
def detailed_jpeg(tmp_path_factory):
    """A 2400x1800 JPEG with fine detail everywhere (fractal plasma) and a line of small text."""
    folder = tmp_path_factory.mktemp('detailed')
    subprocess.run([IMAGEMAGICK, '-size', '2400x1800', 'plasma:fractal', '-fill', 'black', '-pointsize', '12',
                    '-annotate', '+60+120', 'Quercus robur L. 1897, coll. J. Smith 0123456789', '-quality', '92',
                    str(folder / 'sheet.jpg')], check=True, timeout=120)
    return (folder / 'sheet.jpg').read_bytes()


def rgb_samples(data, tmp_path):
    """An image's pixels as 8-bit RGB bytes, decoded by ImageMagick."""
    (tmp_path / 'samples').write_bytes(data)
    return subprocess.run([IMAGEMAGICK, str(tmp_path / 'samples') + '[0]', '-depth', '8', 'rgb:-'],
                          check=True, capture_output=True, timeout=60).stdout


def psnr(first, second, tmp_path):
    """Peak signal-to-noise ratio of two images of one size, in dB (8-bit RGB, all channels)."""
    a, b = rgb_samples(first, tmp_path), rgb_samples(second, tmp_path)
    assert len(a) == len(b)
    squared = sum((x - y) * (x - y) for x, y in zip(a, b)) / len(a)
    return float('inf') if squared == 0 else 10 * math.log10(255 ** 2 / squared)


def full_decode_thumbnail(data, scale, tmp_path, extension='jpg'):
    """The whole decoded image resized by ImageMagick's filter: the quality to match (not `-thumbnail`,
    which point-samples a large image down to five times the size first and so aliases itself)."""
    (tmp_path / 'whole').write_bytes(data)
    out = tmp_path / f'reference.{extension}'
    subprocess.run([IMAGEMAGICK, str(tmp_path / 'whole') + '[0]', '-auto-orient', '-resize', f'{scale}x{scale}>',
                    '-strip', str(out)], check=True, timeout=120)
    return out.read_bytes()


def test_a_jpeg_preview_decoded_at_reduced_size_matches_one_from_the_full_decode_within_35_db(
        client, tmp_path, detailed_jpeg):
    answer = thumbnail(client, 'sheet.jpg', detailed_jpeg, scale=600)
    assert decoded(answer.body, tmp_path)[:3] == ('JPEG', 600, 450)
    assert psnr(answer.body, full_decode_thumbnail(detailed_jpeg, 600, tmp_path), tmp_path) >= 35


SKIMAGE_WHEEL = ('scikit-image==0.25.2', 'scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl',
                 '24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641')
WHEEL_CACHE = pathlib.Path(__file__).parent / '.cache'
UPSCALED = ['astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.jpg']     # soft at 4000 px, as many phone photos
TILED = ['motorcycle_left.png', 'grass.png']     # repeated at their own resolution: detail down to the pixel


def sample_photographs():
    """scikit-image's sample photographs by name, read out of its wheel: fetched once with pip (never
    installed) into tests/.cache and checked against a pinned sha256."""
    spec, name, digest = SKIMAGE_WHEEL
    wheel = WHEEL_CACHE / name
    if not wheel.exists() or hashlib.sha256(wheel.read_bytes()).hexdigest() != digest:
        download = WHEEL_CACHE / f'download-{os.getpid()}'
        download.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
                        '--platform', 'manylinux_2_17_x86_64', '--python-version', '3.11', '--implementation', 'cp',
                        '--abi', 'cp311', '-d', str(download), spec],
                       check=True, stdin=subprocess.DEVNULL, timeout=600)
        fetched = download / name
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == digest
        os.replace(fetched, wheel)
        shutil.rmtree(download)
    with zipfile.ZipFile(wheel) as archive:
        return {photo: archive.read('skimage/data/' + photo) for photo in UPSCALED + TILED}


def large_jpeg(folder, photo, data, how):
    """`photo` made a 4000 px (long side) JPEG at quality 90, both sides divisible by 8 so that libjpeg may
    decode it reduced: upscaled ('resize') or repeated at its own resolution ('tile')."""
    (folder / photo).write_bytes(data)
    width, height = map(int, subprocess.run([IMAGEMAGICK, str(folder / photo), '-format', '%w %h', 'info:'],
                                            check=True, capture_output=True, text=True, timeout=60).stdout.split())
    width, height = ((4000, 4000 * height // width // 8 * 8) if width >= height else
                     (4000 * width // height // 8 * 8, 4000))
    out = folder / (photo + '.jpg')
    source = (['-size', f'{width}x{height}', f'tile:{folder / photo}'] if how == 'tile' else
              [str(folder / photo), '-resize', f'{width}x{height}!'])
    subprocess.run([IMAGEMAGICK, *source, '-colorspace', 'sRGB', '-type', 'TrueColor', '-quality', '90', str(out)],
                   check=True, timeout=120)
    return out.read_bytes()


def text_sheet(folder):
    """A 4000x3000 scanned label sheet: 110 lines of 18 px text (strokes two pixels wide), JPEG quality 90."""
    lines = []
    for row in range(110):
        lines += ['-annotate', f'+40+{40 + 26 * row}', f'Quercus robur L. {1800 + row} coll. J. Smith no. '
                  f'{row * 7919 % 100000:05d} Herb. Mus. Nat. Hist. det. A. B. Cde 2024, loc. 48.{row:03d}N '
                  f'11.{row * 37 % 1000:03d}E alt. {row * 13} m, Quercus petraea']
    subprocess.run([IMAGEMAGICK, '-size', '4000x3000', 'xc:white', '-fill', 'black', '-pointsize', '18', *lines,
                    '-quality', '90', str(folder / 'labels.jpg')], check=True, timeout=120)
    return (folder / 'labels.jpg').read_bytes()


@pytest.fixture(scope='session')
def large_pictures(tmp_path_factory):
    """Large JPEGs by name: real photographs (upscaled, and tiled at their own resolution) and a text sheet."""
    folder = tmp_path_factory.mktemp('photographs')
    photos = sample_photographs()
    pictures = {photo: large_jpeg(folder, photo, photos[photo], 'resize') for photo in UPSCALED}
    pictures.update({photo: large_jpeg(folder, photo, photos[photo], 'tile') for photo in TILED})
    pictures['labels'] = text_sheet(folder)
    return pictures


@pytest.mark.disk_only
@pytest.mark.parametrize('scale', [1000, 500, 256, 123])
@pytest.mark.parametrize('picture', UPSCALED + TILED + ['labels'])
def test_a_preview_of_a_large_photograph_or_text_sheet_matches_one_from_the_full_decode_within_35_db(
        client, tmp_path, large_pictures, picture, scale):
    original = large_pictures[picture]
    answer = thumbnail(client, 'photo.jpg', original, scale=scale)
    reference = full_decode_thumbnail(original, scale, tmp_path)
    assert decoded(answer.body, tmp_path)[1:3] == decoded(reference, tmp_path)[1:3]
    assert psnr(answer.body, reference, tmp_path) >= 35


@pytest.mark.parametrize('size, scale, expected, hint', [
    ('2400x1800', 600, '600x450', 'jpeg:size=1200x900'),    # a half: twice the thumbnail's size, a quarter is not
    ('1000x750', 123, '123x92', 'jpeg:size=500x375'),       # an eighth or a quarter would not divide 750
    ('300x4000', 1000, '75x1000', 'jpeg:size=150x2000'),
    ('1801x1201', 900, '900x600', None)])                   # odd sides: decoded whole
def test_a_jpeg_is_decoded_reduced_only_to_exact_sides_at_least_twice_its_thumbnails_size(
        client, tmp_path, size, scale, expected, hint):
    runs = run_counter(client.app.imagemagick)
    answer = thumbnail(client, 'photo.jpg', make_image(tmp_path, 'plasma:', size, 'jpg'), scale=scale)
    assert 'x'.join(map(str, decoded(answer.body, tmp_path)[1:3])) == expected     # as from the whole image
    assert [arg for arg in runs[-1] if arg.startswith('jpeg:size=')] == ([hint] if hint else [])


# --- TIFF: a pyramid's reduced-resolution page ----------------------------------------------

def tiff_of_pages(pages):
    """An uncompressed little-endian RGB TIFF, one directory per (width, height, colour, NewSubfileType)."""
    out = bytearray(b'II*\0\0\0\0\0')
    link = 4                                     # where the offset of the next directory goes
    for width, height, colour, subfile_type in pages:
        pixels = len(out)
        out += bytes(colour) * (width * height)
        bits = len(out)
        out += struct.pack('<3H', 8, 8, 8)
        entries = [(254, 4, 1, subfile_type), (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits),
                   (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, pixels), (277, 3, 1, 3), (278, 4, 1, height),
                   (279, 4, 1, 3 * width * height), (284, 3, 1, 1)]
        struct.pack_into('<I', out, link, len(out))
        out += struct.pack('<H', len(entries))
        for tag, kind, count, value in entries:
            packed = struct.pack('<I', value) if kind == 4 or count > 1 else struct.pack('<HH', value, 0)
            out += struct.pack('<HHI', tag, kind, count) + packed
        link = len(out)
        out += b'\0\0\0\0'
    return bytes(out)


RED, GREEN, BLUE, YELLOW, CYAN = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)


@pytest.fixture(scope='session')
def pyramid_tiff():
    """A 2000x1500 red scan with reduced-resolution pages (NewSubfileType 1) of halving size, each its own colour."""
    return tiff_of_pages([(2000, 1500, RED, 0), (1000, 750, GREEN, 1), (500, 375, BLUE, 1),
                          (250, 187, YELLOW, 1), (125, 93, CYAN, 1)])


def colour_name(rgb):
    """A colour as ImageMagick names a pixel's."""
    return 'srgb({},{},{})'.format(*rgb)


@pytest.mark.disk_only
@pytest.mark.parametrize('scale, colour, size', [
    (1000, GREEN, (1000, 750)), (600, GREEN, (600, 450)), (400, BLUE, (400, 300)), (123, CYAN, (123, 92)),
    (124, CYAN, (124, 93)),          # from 125x93 ImageMagick alone would make 124x92: the size is the scan's
    (1500, RED, (1500, 1125))])      # no reduced page is large enough
def test_a_pyramid_tiff_thumbnail_is_made_from_its_smallest_reduced_page_still_as_large_at_the_scans_size(
        client, tmp_path, pyramid_tiff, scale, colour, size):
    answer = thumbnail(client, 'scan.tif', pyramid_tiff, scale=scale)
    assert decoded(answer.body, tmp_path)[:3] == ('PNG', *size)
    assert pixel(answer.body, tmp_path, size[0] // 2, size[1] // 2) == colour_name(colour)


@pytest.mark.disk_only
def test_a_multipage_document_tiff_is_thumbnailed_from_its_first_page_though_a_later_smaller_one_has_its_shape(
        client, tmp_path):
    document = tiff_of_pages([(1000, 750, RED, 0), (500, 375, GREEN, 0), (250, 187, BLUE, 0)])
    answer = thumbnail(client, 'letters.tif', document, scale=123)
    assert pixel(answer.body, tmp_path, 60, 45) == colour_name(RED)


@pytest.mark.disk_only
def test_a_reduced_page_of_another_shape_is_not_used_for_a_tiffs_thumbnail(client, tmp_path):
    scan = tiff_of_pages([(1000, 750, RED, 0), (500, 500, GREEN, 1)])
    answer = thumbnail(client, 'scan.tif', scan, scale=123)
    assert pixel(answer.body, tmp_path, 60, 45) == colour_name(RED)


def test_a_tiffs_pages_are_read_only_up_to_the_bound(tmp_path):
    (tmp_path / 'many.tif').write_bytes(tiff_of_pages([(8, 6, RED, 1)] * (TIFF_PAGES_READ + 4)))
    assert tiff_pages(tmp_path / 'many.tif') == [(8, 6, 1)] * TIFF_PAGES_READ


# --- The derivative ladder: a smaller thumbnail from a cached larger one -----------------------

def record_sources(thumbnailer):
    """The size (width, height) of every source a thumbnailer converts, in order."""
    sizes = []
    real = thumbnailer.converted

    def recording(source, *args, **kwargs):
        found = image_size(source, sniff_kind(source))
        sizes.append((found.width, found.height) if found else None)
        return real(source, *args, **kwargs)
    thumbnailer.converted = recording
    return sizes


def ladder_client(make_client, scales):
    """A client whose server climbs down from `scales`, its uploads not pregenerated (the test asks itself)."""
    client = make_client(PREGENERATE_SCALE=scales)
    client.app.scheduler.in_background = lambda job, key=None: None
    return client


def test_a_smaller_thumbnail_is_made_from_the_cached_larger_scale(make_client, tmp_path, detailed_jpeg):
    client = ladder_client(make_client, [600])
    client.upload('sheet.jpg', detailed_jpeg)
    assert client.fileget('sheet.jpg', 'T', scale='600').status_int == 200
    sources = record_sources(client.app.imagemagick)
    answer = client.fileget('sheet.jpg', 'T', scale='123')
    assert sources == [(600, 450)]                       # the cached 600, not the 2400x1800 original
    kind, width, height = decoded(answer.body, tmp_path)[:3]
    assert (kind, width) == ('JPEG', 123) and abs(height - 92) <= 1     # 92 from the original: 1800 * 123 / 2400


def test_without_pregeneration_a_smaller_thumbnail_is_made_from_a_larger_one_made_on_request(
        make_client, tmp_path, detailed_jpeg):
    client = make_client(PREGENERATE_SCALE=None)
    client.upload('sheet.jpg', detailed_jpeg)
    assert client.fileget('sheet.jpg', 'T', scale='1000').status_int == 200      # a preview viewed first
    sources = record_sources(client.app.imagemagick)
    answer = client.fileget('sheet.jpg', 'T', scale='123')
    assert sources == [(1000, 750)]                      # the cached 1000, not the 2400x1800 original
    kind, width, height = decoded(answer.body, tmp_path)[:3]
    assert (kind, width) == ('JPEG', 123) and abs(height - 92) <= 1


def test_the_smallest_cached_larger_thumbnail_is_the_source(make_client, detailed_jpeg):
    client = make_client(PREGENERATE_SCALE=[1000])
    client.upload('sheet.jpg', detailed_jpeg)
    for scale in ('1000', '400'):
        assert client.fileget('sheet.jpg', 'T', scale=scale).status_int == 200
    sources = record_sources(client.app.imagemagick)
    client.fileget('sheet.jpg', 'T', scale='123')
    assert sources == [(400, 300)]


def test_a_webp_thumbnail_made_on_request_is_never_the_source_of_a_smaller_one(make_client, detailed_jpeg):
    client = make_client(PREGENERATE_SCALE=None, WEBP_THUMBNAILS=True)
    client.upload('sheet.jpg', detailed_jpeg)
    client.fileget('sheet.jpg', 'T', scale='1000', headers={'Accept': 'image/webp'})
    sources = record_sources(client.app.imagemagick)
    client.fileget('sheet.jpg', 'T', scale='123')
    assert sources == [(2400, 1800)]


def test_a_cached_larger_thumbnail_of_replaced_bytes_is_not_used(make_client, tmp_path, detailed_jpeg):
    client = ladder_client(make_client, [600])
    client.upload('sheet.jpg', detailed_jpeg)
    assert client.fileget('sheet.jpg', 'T', scale='600').status_int == 200
    client.upload('sheet.jpg', make_image(tmp_path, 'plasma:', '900x1200', 'jpg'))
    sources = record_sources(client.app.imagemagick)
    client.fileget('sheet.jpg', 'T', scale='123')
    assert sources == [(900, 1200)]


def test_a_cached_larger_thumbnail_that_cannot_be_read_falls_back_to_the_original_without_a_remembered_failure(
        make_client, tmp_path, jpeg):
    client = ladder_client(make_client, [600])
    client.upload('photo.jpg', jpeg)
    client.upload('garbage.jpg', b'\xff\xd8 not a picture')
    storage = client.app.storage
    client.app.cache.larger_fresh_thumbnail = lambda *args: 'photo_600.jpg'
    storage.local_derivative = lambda coll, cache_name: storage.local_original('Fish', 'garbage.jpg')
    answer = client.fileget('photo.jpg', 'T', scale='123')
    assert decoded(answer.body, tmp_path)[:3] == ('JPEG', 123, 82)


def test_pregenerated_scales_are_made_largest_first_each_from_the_one_before(make_client, detailed_jpeg):
    client = make_client(PREGENERATE_SCALE=[123, 600])
    sources = record_sources(client.app.imagemagick)
    client.upload('sheet.jpg', detailed_jpeg)
    assert wait_for(lambda: len(sources) == 2, 60)
    assert sources == [(2400, 1800), (600, 450)]
    assert client.fileget('sheet.jpg', 'T', scale='123').status_int == 200


A4 = ('%!PS\n<< /PageSize [595 842] >> setpagedevice /Helvetica findfont 7 scalefont setfont\n'
      + ''.join(f'40 {800 - 12 * line} moveto (Field notebook, station {line}: Quercus robur, 3 specimens) show\n'
                for line in range(60)) + 'showpage\n')


@pytest.mark.parametrize('scale, expected', [(1000, (707, 1000)), (123, (87, 123)), (2000, (1413, 2000))])
def test_a_pdf_preview_has_its_long_side_at_the_scale_asked(client, tmp_path, scale, expected):
    answer = thumbnail(client, 'notebook.pdf', pdf(tmp_path, A4), scale=scale)
    assert decoded(answer.body, tmp_path)[1:3] == expected


def test_a_pdf_preview_is_rendered_at_its_size_so_its_text_matches_ghostscripts_own_render(client, tmp_path):
    document = pdf(tmp_path, A4)
    answer = thumbnail(client, 'notebook.pdf', document, scale=1000)
    subprocess.run(['gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=png16m', f'-r{72 * 1000 / 842}',
                    '-dTextAlphaBits=4', '-dGraphicsAlphaBits=4', '-o', str(tmp_path / 'direct.png'),
                    str(tmp_path / 'out.pdf')], check=True, timeout=60)
    direct = (tmp_path / 'direct.png').read_bytes()
    assert decoded(direct, tmp_path)[1:3] == decoded(answer.body, tmp_path)[1:3]
    assert psnr(answer.body, direct, tmp_path) >= 35

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



def test_a_bigtiff_is_held_to_the_pixel_setting(make_client, tmp_path):
    client = make_client(THUMBNAIL_MAX_PIXELS=10_000)
    bigtiff = make_image(tmp_path, 'plasma:', '200x100', 'tiff64')
    assert bigtiff[:4] == b'II+\0'
    answer = thumbnail(client, 'big.tif', bigtiff, status=404)
    assert answer.text == 'The image has too many pixels to thumbnail.'


def test_the_pages_of_a_bigtiff_are_read(tmp_path):
    path = tmp_path / 'big.tif'
    path.write_bytes(make_image(tmp_path, 'plasma:', '200x100', 'tiff64'))
    assert tiff_pages(path) == [(200, 100, 0)]

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


def conversions():
    """Pids of the ImageMagick processes this test process (the in-process server) has running."""
    return children_of_this_process(IMAGEMAGICK)


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
    seen = gate_conversions(client.app.imagemagick)
    arrivals = client.app.cache.locks = Arrivals(client.app.cache.locks)
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
    seen = gate_conversions(client.app.imagemagick)
    slots = client.app.scheduler.slots = Arrivals(client.app.scheduler.slots)
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
    real = client.app.imagemagick._convert
    replaced = []

    def convert_then_replace(*args):
        real(*args)
        if not replaced:
            replaced.append(client.upload('a.jpg', png).text)    # new bytes land mid-conversion
    client.app.imagemagick._convert = convert_then_replace
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


PEAK_OF_ONE_CONVERSION = """
import resource, sys
from config import load_config
from engines.imagemagick import ImageMagick
from engines.scheduling import Scheduler
config = load_config({'BASE_DIR': sys.argv[2], 'THUMBNAIL_MEMORY_LIMIT': int(sys.argv[3])}, environ={})
with ImageMagick(config, Scheduler(config, 1)).converted(sys.argv[1], 123, sys.argv[2]):
    pass
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def test_one_conversion_stays_within_thumbnail_memory_limit_and_imagemagicks_own(tmp_path):
    """A 4000x4000 16-bit PNG's pixels (128 MiB in ImageMagick's cache) against a limit of 64 MiB: they go to
    the disk cache, so the largest tool's resident memory stays under the limit plus 48 MiB of its own."""
    source = tmp_path / 'scan.png'
    subprocess.run([IMAGEMAGICK, '-size', '4000x4000', 'xc:tan', '-depth', '16', f'PNG48:{source}'], check=True,
                   timeout=120)
    limit = 64 * 1024 ** 2
    done = subprocess.run([sys.executable, '-c', PEAK_OF_ONE_CONVERSION, str(source), str(tmp_path), str(limit)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300, check=True)
    assert int(done.stdout) <= limit + 48 * 1024 ** 2


@pytest.mark.disk_only
def test_thumbnails_and_tiles_are_made_when_the_thumbnails_folder_is_on_another_file_system(make_client, tmp_path, jpeg):
    other = tempfile.mkdtemp(dir='/dev/shm')          # tmpfs, where the attachments folder is not
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip('/dev/shm is on the file system of the attachments folder here')
        (tmp_path / 'attachments' / 'fish').mkdir(parents=True)
        os.symlink(other, tmp_path / 'attachments' / 'fish' / 'thumbnails')
        client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
        client.upload('a.jpg', jpeg)
        assert decoded(client.fileget('a.jpg', 'T', scale='64').body, tmp_path)[:3] == ('JPEG', 64, 43)
        tile = client.get(f"/iiif/3/{iiif.spelling('Fish', 'a.jpg')}/full/max/0/default.jpg", {})
        assert decoded(tile.body, tmp_path)[:3] == ('JPEG', 300, 200)
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_thumbnails_work_under_a_low_hard_file_size_limit(make_client, jpeg, monkeypatch):
    real = resource.getrlimit
    monkeypatch.setattr('engines.imagemagick.resource.getrlimit',
                        lambda which: (10 ** 6, 10 ** 6) if which == resource.RLIMIT_FSIZE else real(which))
    client = make_client()
    assert client.app.imagemagick.disk_limit == 10 ** 6
    assert thumbnail(client, 'a.jpg', jpeg).status_int == 200


# --- Bounds: what headers say, memory, the queue, failures remembered ----------------------

def with_fill_bytes(jpeg_bytes):
    """The JPEG with a fill byte 0xFF before its frame header (SOFn), which decoders skip."""
    at = 2
    while not (0xC0 <= jpeg_bytes[at + 1] <= 0xCF and jpeg_bytes[at + 1] not in (0xC4, 0xC8, 0xCC)):
        at += 2 + struct.unpack('>H', jpeg_bytes[at + 2:at + 4])[0]
    return jpeg_bytes[:at] + b'\xff' + jpeg_bytes[at:]


@pytest.mark.parametrize('coding', ['baseline', 'progressive'])
def test_a_jpeg_with_fill_bytes_before_its_frame_is_held_to_the_pixel_setting(make_client, tmp_path, coding):
    client = make_client(THUMBNAIL_MAX_PIXELS=10_000)
    extra = ['-interlace', 'JPEG'] if coding == 'progressive' else []
    original = with_fill_bytes(make_image(tmp_path, 'plasma:', '200x100', 'jpg', *extra))
    answer = thumbnail(client, 'filled.jpg', original, status=404)
    assert answer.text == 'The image has too many pixels to thumbnail.'


def gif(screen, frames):
    """A GIF with this logical screen and these frames (left, top, width, height), each one pixel of data."""
    data = b'\x02\x02\x4c\x01\x00'          # LZW code size 2, one sub-block: clear, a pixel, end
    return (b'GIF89a' + struct.pack('<HHBBB', *screen, 0, 0, 0)
            + b''.join(b',' + struct.pack('<HHHHB', *frame, 0) + data for frame in frames) + b';')


@pytest.mark.parametrize('frames', [[(0, 0, 2000, 1000)], [(0, 0, 1, 1), (0, 0, 2000, 1000)]],
                         ids=['first frame', 'second frame'])
def test_a_gif_frame_larger_than_its_screen_is_held_to_the_pixel_setting(make_client, frames):
    client = make_client(THUMBNAIL_MAX_PIXELS=1_000_000)
    answer = thumbnail(client, 'screen.gif', gif((1, 1), frames), status=404)
    assert answer.text == 'The image has too many pixels to thumbnail.'


@pytest.mark.parametrize('fmt, extra', [('png', ['-interlace', 'PNG']),
                                        ('tif', ['-define', 'tiff:rows-per-strip=200'])])
def test_an_image_whose_decoder_would_hold_more_than_the_memory_setting_is_refused(make_client, tmp_path, fmt, extra):
    client = make_client(THUMBNAIL_MEMORY_LIMIT=300_000)     # 300x200 16-bit RGB whole: 360 000 bytes
    original = make_image(tmp_path, 'gradient:red-blue', '300x200', fmt, '-depth', '16', *extra)
    answer = thumbnail(client, f'deep.{fmt}', original, status=404)
    assert answer.text == 'The image would need too much memory to thumbnail.'


def test_a_huge_interlaced_16_bit_png_is_refused_at_once(client):
    ihdr = struct.pack('>IIBBBBB', 11_000, 11_000, 16, 6, 0, 0, 1)       # 968 MB decoded whole
    chunk = b'IHDR' + ihdr
    header = b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + chunk + struct.pack('>I', zlib.crc32(chunk))
    started = time.monotonic()
    answer = thumbnail(client, 'deep.png', header, status=404)
    assert answer.text == 'The image would need too much memory to thumbnail.'
    assert time.monotonic() - started < 2


def pdf_file(*objects):
    """A PDF made of these objects (1: catalog), with a cross-reference table."""
    out, offsets = b'%PDF-1.4\n', []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b'%d 0 obj\n%s\nendobj\n' % (number, body)
    out += b'xref\n0 %d\n0000000000 65535 f \n' % (len(objects) + 1)
    out += b''.join(b'%010d 00000 n \n' % offset for offset in offsets)
    return out + b'trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n' % (len(objects) + 1, len(out))


def pdf_stream(entries, data):
    return b'<< %s /Length %d >>\nstream\n%s\nendstream' % (entries, len(data), data)


def huge_page_pdf(side=200_000):
    """One page of side x side points (a 200 000 pt page at 72 dpi is 4e10 pixels), a blue square in its middle."""
    middle = side // 2
    return pdf_file(b'<< /Type /Catalog /Pages 2 0 R >>', b'<< /Type /Pages /Kids [3 0 R] /Count 1 >>',
                    b'<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R >>' % (side, side),
                    pdf_stream(b'', b'0 0 1 rg %d %d %d %d re f' % (middle - side // 4, middle - side // 4,
                                                                     side // 2, side // 2)))


def nested_forms_pdf(depth=25, fan=4):
    """A small page whose form XObject draws the next one `fan` times, `depth` deep: fan**depth paintings."""
    forms = [pdf_stream(b'/Type /XObject /Subtype /Form /BBox [0 0 200 200] /Resources << /XObject << /X %d 0 R >> >>'
                        % (6 + level), b' '.join([b'/X Do'] * fan)) for level in range(depth - 1)]
    forms.append(pdf_stream(b'/Type /XObject /Subtype /Form /BBox [0 0 200 200]', b'0 0 1 rg 0 0 10 10 re f'))
    return pdf_file(b'<< /Type /Catalog /Pages 2 0 R >>', b'<< /Type /Pages /Kids [3 0 R] /Count 1 >>',
                    b'<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Resources << /XObject << /X 5 0 R >> >> '
                    b'/Contents 4 0 R >>', pdf_stream(b'', b'/X Do'), *forms)


def test_a_pdf_with_a_huge_page_is_rendered_at_a_bounded_size_in_time(make_client, tmp_path):
    client = make_client(THUMBNAIL_TIMEOUT=20)
    started = time.monotonic()
    answer = thumbnail(client, 'poster.pdf', huge_page_pdf())
    assert time.monotonic() - started < 10
    assert decoded(answer.body, tmp_path)[:3] == ('PNG', 123, 123)
    assert pixel(answer.body, tmp_path, 61, 61) in ('srgb(0,0,255)', 'blue')


def run_counter(thumbnailer):
    """Count the tools a thumbnailer runs."""
    runs = []
    real = thumbnailer.run

    def counted(program, *args, **limits):
        runs.append(args)
        return real(program, *args, **limits)
    thumbnailer.run = counted
    return runs


def test_a_failed_conversion_is_answered_again_without_converting(client):
    client.upload('broken.png', png_claiming(100, 100))
    runs = run_counter(client.app.imagemagick)
    first = client.fileget('broken.png', 'T', scale='123', status=404).text
    again = client.fileget('broken.png', 'T', scale='123', status=404).text
    assert (first, again, len(runs)) == ('This file could not be thumbnailed.',) * 2 + (1,)


def test_a_failed_ghostscript_page_is_remembered_at_every_scale(make_client):
    client = make_client(THUMBNAIL_TIMEOUT=1)
    client.upload('forms.pdf', nested_forms_pdf())
    assert client.fileget('forms.pdf', 'T', scale='123', status=404).text == 'Making the thumbnail took too long.'
    started = time.monotonic()
    answer = client.fileget('forms.pdf', 'T', scale='300', status=404)
    assert (answer.text, time.monotonic() - started < 0.5) == ('Making the thumbnail took too long.', True)


@pytest.mark.parametrize('same_bytes', [True, False], ids=['same bytes', 'new bytes'])
def test_an_upload_forgets_the_failures_of_the_file_it_replaces(client, png, same_bytes):
    client.upload('label.png', png_claiming(100, 100))
    client.fileget('label.png', 'T', scale='123', status=404)
    runs = run_counter(client.app.imagemagick)
    client.upload('label.png', png_claiming(100, 100) if same_bytes else png)
    client.fileget('label.png', 'T', scale='123', status=404 if same_bytes else 200)
    assert len(runs) == 1


def test_a_delete_forgets_the_failures_of_the_file(client):
    client.upload('label.png', png_claiming(100, 100))
    client.fileget('label.png', 'T', scale='123', status=404)
    client.delete('label.png')
    failures = client.app.scheduler.failures
    assert failures.reasons == {}


def test_failures_remembered_are_bounded_oldest_forgotten_first(make_client):
    client = make_client(THUMBNAIL_FAILURES_REMEMBERED=2)
    for i in range(3):
        client.upload(f'{i}.png', png_claiming(100, 100))
        client.fileget(f'{i}.png', 'T', scale='123', status=404)
    assert [key[0][0][-1] for key in client.app.scheduler.failures.reasons] == ['1.png', '2.png']


def process_limit(pid, name):
    """A limit of a running process as /proc/<pid>/limits states it (soft value)."""
    with open(f'/proc/{pid}/limits') as limits:
        for line in limits:
            if line.startswith(name):
                return line[len(name):].split()[0]
    return None


def children_of_this_process(path):
    """Pids of this process's children running `path`."""
    found = []
    for pid, parent in parent_pids().items():
        try:
            if parent == os.getpid() and os.path.realpath(f'/proc/{pid}/exe') == os.path.realpath(path):
                found.append(pid)
        except OSError:                # it ended meanwhile
            pass
    return found


@pytest.mark.parametrize('tool', ['imagemagick', 'ghostscript'])
def test_every_conversion_tool_runs_under_the_address_space_limit(make_client, tool):
    client = make_client(THUMBNAIL_ADDRESS_SPACE_LIMIT=700 * 1024 ** 2, THUMBNAIL_TIMEOUT=5)
    name, data = ('sheet.tif', slow_tiff()) if tool == 'imagemagick' else ('forms.pdf', nested_forms_pdf())
    path = IMAGEMAGICK if tool == 'imagemagick' else shutil.which('gs')
    client.upload(name, data)
    request = threading.Thread(target=client.fileget, args=(name, 'T'), kwargs={'scale': '123', 'status': '*'})
    request.start()
    try:
        assert wait_for(lambda: children_of_this_process(path), 30)
        limits = [process_limit(pid, 'Max address space') for pid in children_of_this_process(path)]
    finally:
        request.join(60)
    assert limits and set(limits) == {str(700 * 1024 ** 2)}


def answer_soon(job, seconds=15):
    """job()'s result from a thread, or None when it has not answered within `seconds`."""
    threads, results = in_threads(1, lambda _i: job())
    threads[0].join(seconds)
    return results[0]


def test_a_thumbnail_request_beyond_the_queue_is_answered_503_with_retry_after_at_once(make_client, jpeg):
    client = make_client(THUMBNAIL_WORKERS=1, THUMBNAIL_QUEUE=1)
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        client.upload(name, jpeg)
    seen = gate_conversions(client.app.imagemagick)
    slots = client.app.scheduler.slots = Arrivals(client.app.scheduler.slots)
    held = in_threads(2, lambda i: client.fileget('ab'[i] + '.jpg', 'T', scale='100').status_int)
    try:
        assert wait_for(lambda: slots.count == 2 and seen['running'] == 1, 30)     # one converting, one queued
        started = time.monotonic()
        answer = answer_soon(lambda: client.fileget('c.jpg', 'T', scale='100', status=503))
        waited = time.monotonic() - started
    finally:
        seen['gate'].set()
        statuses = joined(*held)
    assert (answer.text, answer.headers['Retry-After']) == (
        'Too many thumbnails are being made: try again shortly.', '5')
    assert waited < 2
    assert statuses == [200, 200]


@contextlib.contextmanager
def the_one_slot_held(client, jpeg):
    """Upload a.jpg and b.jpg, and hold a conversion of a.jpg (at scale 100) in the one slot until the block ends;
    yields the list that then holds that request's status."""
    client.upload('a.jpg', jpeg)
    client.upload('b.jpg', jpeg)
    seen = gate_conversions(client.app.imagemagick)
    held, statuses = in_threads(1, lambda i: client.fileget('a.jpg', 'T', scale='100').status_int), []
    try:
        assert wait_for(lambda: seen['running'] == 1, 30)
        yield statuses
    finally:
        seen['gate'].set()
        statuses.extend(joined(*held))


def test_a_thumbnail_request_that_waits_longer_than_the_queue_wait_is_answered_503(make_client, jpeg):
    client = make_client(THUMBNAIL_WORKERS=1, THUMBNAIL_QUEUE_WAIT=1)
    with the_one_slot_held(client, jpeg):
        started = time.monotonic()
        answer = answer_soon(lambda: client.fileget('b.jpg', 'T', scale='100', status=503))
        waited = time.monotonic() - started
    assert answer.headers['Retry-After'] == '5'
    assert 1 <= waited < 5


class SlotHolder:
    """A thread that takes a conversion slot for one class of work and holds it until released."""

    def __init__(self, slots, work):
        self.taken, self.release, self.failed = threading.Event(), threading.Event(), []
        self.thread = threading.Thread(target=self._hold, args=(slots, work))
        self.thread.start()

    def _hold(self, slots, work):
        try:
            with slots(work):
                self.taken.set()
                self.release.wait(30)
        except ThumbnailsBusy:
            self.failed.append('busy')

    def done(self):
        self.release.set()
        self.thread.join(30)


def test_background_work_never_holds_every_slot():
    slots = ConversionSlots(workers=2, wait=10)
    first, second = SlotHolder(slots, BACKGROUND), SlotHolder(slots, BACKGROUND)
    try:
        assert wait_for(lambda: first.taken.is_set() or second.taken.is_set())
        one_slot_left = not wait_for(lambda: first.taken.is_set() and second.taken.is_set(), 1)
        interactive = SlotHolder(slots, INTERACTIVE)
        interactive_ran = interactive.taken.wait(5)
        interactive.done()
    finally:
        first.done()
        second.done()
    assert (one_slot_left, interactive_ran) == (True, True)


def test_interactive_work_waiting_goes_ahead_of_background_work():
    slots = ConversionSlots(workers=1, wait=10)
    running = SlotHolder(slots, INTERACTIVE)
    assert running.taken.wait(5)
    waiting = SlotHolder(slots, INTERACTIVE)
    assert wait_for(lambda: slots.waiting[INTERACTIVE] == 1)
    background = SlotHolder(slots, BACKGROUND)
    assert wait_for(lambda: slots.waiting[BACKGROUND] == 1)
    running.done()
    try:
        assert waiting.taken.wait(5)
        background_started_meanwhile = background.taken.is_set()
    finally:
        waiting.done()
        background.done()
    assert background_started_meanwhile is False
    assert background.failed == []


def test_a_request_waits_for_a_background_conversion_of_its_thumbnail_no_longer_than_thumbnail_queue_wait(
        make_client, jpeg):
    client = make_client(THUMBNAIL_WORKERS=1, THUMBNAIL_QUEUE_WAIT=1)
    locks = client.app.cache.locks = Arrivals(client.app.cache.locks)
    with the_one_slot_held(client, jpeg):
        client.app.scheduler.in_background(            # as an upload's pregeneration: b's lock, waiting for a slot
            functools.partial(client.app.cache.ensure_thumbnail, 'Fish', 'b.jpg', 100, work=BACKGROUND))
        assert wait_for(lambda: locks.count == 2, 30)
        started = time.monotonic()
        answer = answer_soon(lambda: client.fileget('b.jpg', 'T', scale='100', status=503), seconds=10)
        waited = time.monotonic() - started
    assert answer.headers['Retry-After'] == '5' and 1 <= waited < 5


def test_conversions_leave_five_of_the_threads_to_other_requests(make_client, jpeg):
    client = make_client(THREADS=6, THUMBNAIL_WORKERS=1, THUMBNAIL_QUEUE=16)     # one may wait or convert
    with the_one_slot_held(client, jpeg) as statuses:
        answer = answer_soon(lambda: client.fileget('b.jpg', 'T', scale='100', status=503))
    assert (answer.headers['Retry-After'], statuses) == ('5', [200])


def test_a_small_file_served_from_memory_is_read_again_once_it_is_replaced(tmp_path):
    """SMALL_FILES answers a kept file after one stat; a file replaced under the same path is read anew."""
    path = tmp_path / 'kept.bin'
    path.write_bytes(b'first')
    kept = SmallFiles(most=1024, largest=64)
    assert kept.get(str(path)) is None
    kept.put(str(path), os.stat(path), b'first')
    assert kept.get(str(path))[1] == b'first'
    replacement = tmp_path / 'new.bin'
    replacement.write_bytes(b'other')
    os.replace(replacement, path)
    assert kept.get(str(path)) is None


def test_small_files_keep_at_most_their_bound_dropping_the_least_recently_used(tmp_path):
    kept = SmallFiles(most=10, largest=8)
    for name in 'abc':
        (tmp_path / name).write_bytes(b'1234')
        kept.put(str(tmp_path / name), os.stat(tmp_path / name), b'1234')
    assert kept.held <= 10 and kept.get(str(tmp_path / 'a')) is None and kept.get(str(tmp_path / 'c'))
