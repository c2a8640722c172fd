"""Images made for tests: by ImageMagick (the real one, resolved past any stand-in named `convert`), a PNG made
without it, EXIF written into a JPEG; and what ImageMagick reads back from bytes."""

import secrets
import struct
import subprocess
import zlib

from engines.imagemagick import find_imagemagick


IMAGEMAGICK = find_imagemagick(None)


def magick(*args, output=None):
    """Run the real ImageMagick; with `output`, return the bytes it wrote there."""
    subprocess.run([IMAGEMAGICK, *args], check=True, capture_output=True, timeout=120)
    if output:
        with open(output, 'rb') as f:
            return f.read()


def image_info(data, tmp_path):
    """(format, width, height) of image bytes, decoded by ImageMagick."""
    path = tmp_path / f'probe-{secrets.token_hex(4)}'
    path.write_bytes(data)
    identify = subprocess.run([IMAGEMAGICK, str(path) + '[0]', '-format', '%m %w %h', 'info:'],
                              check=True, capture_output=True, text=True, timeout=60)
    kind, width, height = identify.stdout.split()
    return kind, int(width), int(height)


def make_image(tmp_path, spec, size, fmt, *extra):
    """Image bytes made by ImageMagick: e.g. make_image(tmp, 'plasma:', '300x200', 'jpg')."""
    out = tmp_path / f'made-{secrets.token_hex(4)}.{fmt}'
    return magick('-size', size, spec, *extra, f'{fmt}:{out}', output=out)


def png_bytes(width, height):
    """A grey PNG made without ImageMagick (for tests that need many images quickly)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    rows = b''.join(b'\0' + bytes([128]) * width for _ in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def _ifd(entries, start):
    """One little-endian TIFF directory placed at `start`: (tag, type, value) with ASCII, SHORT, LONG."""
    data_at = start + 2 + 12 * len(entries) + 4
    head, data = struct.pack('<H', len(entries)), b''
    for tag, kind, value in sorted(entries):
        raw = value.encode() + b'\0' if kind == 2 else struct.pack('<H' if kind == 3 else '<I', value)
        field = raw.ljust(4, b'\0') if len(raw) <= 4 else struct.pack('<I', data_at + len(data))
        if len(raw) > 4:
            data += raw
        head += struct.pack('<HHI', tag, kind, len(raw) if kind == 2 else 1) + field
    return head + struct.pack('<I', 0) + data


def with_exif(jpeg_bytes, date=None, orientation=None, make='Canon', latitude_ref='N'):
    """The JPEG with an Exif APP1 segment: Make and Orientation (Image), DateTimeOriginal, GPS."""
    image = [(0x010F, 2, make)] + ([(0x0112, 3, orientation)] if orientation else [])
    exif = [(0x9003, 2, date)] if date else [(0x9000, 2, '0230')]
    gps = [(0x0001, 2, latitude_ref)]
    ifd0_size = len(_ifd(image + [(0x8769, 4, 0), (0x8825, 4, 0)], 8))
    exif_at = 8 + ifd0_size
    gps_at = exif_at + len(_ifd(exif, exif_at))
    tiff = (b'II*\0' + struct.pack('<I', 8) + _ifd(image + [(0x8769, 4, exif_at), (0x8825, 4, gps_at)], 8)
            + _ifd(exif, exif_at) + _ifd(gps, gps_at))
    payload = b'Exif\0\0' + tiff
    segment = b'\xff\xe1' + struct.pack('>H', len(payload) + 2) + payload
    app0_end = 4 + struct.unpack('>H', jpeg_bytes[4:6])[0] if jpeg_bytes[2:4] == b'\xff\xe0' else 2
    return jpeg_bytes[:app0_end] + segment + jpeg_bytes[app0_end:]
