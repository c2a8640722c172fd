"""File kinds: what a file's first bytes show it to be, what it is served as, and what an image's header says
about its size and the memory its decoder holds (read cheaply, before any tool is run on it)."""

import mimetypes
import os
import re
import struct
import typing

mimetypes.add_type('image/heic', '.heic')
mimetypes.add_type('image/heif', '.heif')

HEIF_BRANDS = {b'heic', b'heix', b'hevc', b'hevx', b'heim', b'heis', b'mif1', b'msf1'}


def sniff_kind(path):
    """The MIME type of a file told from its first bytes, or None when unknown."""
    try:
        with open(path, 'rb') as f:
            return kind_of(f.read(1024))
    except OSError:
        return None


def kind_of(head):
    """The MIME type that a file's first bytes show, or None when unknown."""
    if head.startswith(b'\xff\xd8\xff'):
        return 'image/jpeg'
    if head.startswith(b'\x89PNG\r\n\x1a\n'):
        return 'image/png'
    if head[:6] in (b'GIF87a', b'GIF89a'):
        return 'image/gif'
    if head[:4] in (b'II*\0', b'MM\0*', b'II+\0', b'MM\0+'):     # TIFF, BigTIFF
        return 'image/tiff'
    if head.startswith(b'%PDF-'):          # not merely inside: Ghostscript would run PostScript
        return 'application/pdf'
    if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
        return 'image/webp'
    if head[4:8] == b'ftyp' and head[8:12] in HEIF_BRANDS:
        return 'image/heic' if head[8:12].startswith(b'he') else 'image/heif'
    return None


def content_type(path, name):
    """What a file is served as: its extension's type, else its bytes', else binary."""
    return type_by_name(name) or sniff_kind(path) or 'application/octet-stream'


PASSIVE_TYPES = {'application/pdf', 'application/octet-stream', 'text/plain', 'text/csv',
                 'application/zip', 'application/json'}


def may_run_scripts(mimetype):
    """Whether a browser opening a file of this type might run scripts in it (HTML, SVG, any XML, ...)."""
    major = mimetype.split('/')[0]
    return mimetype == 'image/svg+xml' or not (major in ('image', 'audio', 'video') or mimetype in PASSIVE_TYPES)


class ImageSize(typing.NamedTuple):
    """What an image's header says: its size in pixels and the bytes its decoder holds at once."""
    width: int
    height: int
    held: int = 0                # 0: the decoder works a row (or a small strip) at a time


PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}          # per pixel, by colour type

JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # SOF0-SOF15; C4, C8, CC are other markers

JPEG_WHOLE_IMAGE = {0xC2, 0xC3, 0xC6, 0xC7, 0xCA, 0xCB, 0xCE, 0xCF}   # progressive or lossless: kept whole


def image_size(path, kind):
    """The ImageSize read from an image's header, or None when it cannot be told cheaply."""
    try:
        with open(path, 'rb') as f:
            if kind == 'image/png':
                return png_size(f.read(33))
            if kind == 'image/gif':
                return gif_size(f)
            if kind == 'image/jpeg':
                return jpeg_size(f)
            if kind == 'image/tiff':
                return tiff_size(f)
            if kind in ('image/heic', 'image/heif'):
                return heif_size(f.read(1 << 20))
    except (OSError, struct.error, KeyError):
        return None
    return None


def png_size(head):
    """IHDR: size, bit depth and samples; an interlaced PNG is decoded whole before it is shrunk."""
    if head[12:16] != b'IHDR':
        return None
    width, height, depth, colour, _compression, _filter, interlace = struct.unpack('>IIBBBBB', head[16:29])
    whole = width * height * PNG_SAMPLES[colour] * depth // 8
    return ImageSize(width, height, whole if interlace else 0)


def gif_size(f):
    """The logical screen and every frame's image descriptor: the largest extent counts."""
    f.seek(6)
    width, height, flags = struct.unpack('<HHB', f.read(5))
    f.seek(2 + colour_table_bytes(flags), os.SEEK_CUR)
    while True:
        block = f.read(1)
        if block == b',':
            left, top, frame_width, frame_height, flags = struct.unpack('<HHHHB', f.read(9))
            width, height = max(width, left + frame_width), max(height, top + frame_height)
            f.seek(colour_table_bytes(flags) + 1, os.SEEK_CUR)        # and the LZW code size
        elif block == b'!':
            f.seek(1, os.SEEK_CUR)
        else:                      # the trailer, the end of the file, or something broken
            return ImageSize(width, height)
        skip_sub_blocks(f)


def colour_table_bytes(flags):
    """The length of the colour table a GIF screen or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def skip_sub_blocks(f):
    """Skip a GIF's data sub-blocks up to their zero-length terminator."""
    while True:
        length = f.read(1)
        if not length or length == b'\0':
            return
        f.seek(length[0], os.SEEK_CUR)


def jpeg_size(f):
    """Walk a JPEG's marker segments (fill bytes 0xFF allowed before each marker) to its frame header."""
    f.seek(2)
    while True:
        byte = f.read(1)
        if byte != b'\xff':
            return None
        marker = f.read(1)
        while marker == b'\xff':
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue
        length = struct.unpack('>H', f.read(2))[0]
        if code in JPEG_FRAMES:
            _precision, height, width, components = struct.unpack('>BHHB', f.read(6))
            whole = width * height * components * 2 if code in JPEG_WHOLE_IMAGE else 0   # 16-bit coefficients
            return ImageSize(width, height, whole)
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)


TIFF_TAGS = {254: 'subfile_type', 256: 'width', 257: 'height', 258: 'bits', 277: 'samples', 278: 'rows_per_strip',
             322: 'tile_width', 323: 'tile_height'}

TIFF_INTEGERS = {3: 'H', 4: 'I', 16: 'Q'}   # SHORT, LONG and BigTIFF's LONG8, as struct formats

TIFF_PAGES_READ = 16           # directories read for reduced-resolution pages: a pyramid of 64K px has 16

TIFF_ENTRIES_READ = 64         # entries read of each: the tags looked for are among the lowest numbered


def tiff_start(f):
    """(byte order, whether BigTIFF, offset of the first directory) of the TIFF whose start f is at."""
    order = '<' if f.read(2) == b'II' else '>'
    if struct.unpack(order + 'H', f.read(2))[0] == 43:     # BigTIFF (as libvips writes pyramids): 8-byte offsets
        f.seek(8)
        return order, True, struct.unpack(order + 'Q', f.read(8))[0]
    return order, False, struct.unpack(order + 'I', f.read(4))[0]


def tiff_directory(f, order, big, entries=None):
    """The looked-for tags of the directory at f's position (of its first `entries` entries; all: None) and the
    offset of the next directory (0: none)."""
    count_format, entry_format, offset_format = ('Q', 'HHQ8s', 'Q') if big else ('H', 'HHI4s', 'I')
    start, found = f.tell(), {}
    count = struct.unpack(order + count_format, f.read(struct.calcsize(count_format)))[0]
    entry_size = struct.calcsize(order + entry_format)
    for _ in range(count if entries is None else min(count, entries)):
        tag, kind, _count, value = struct.unpack(order + entry_format, f.read(entry_size))
        if tag in TIFF_TAGS and kind in TIFF_INTEGERS:  # a list (BitsPerSample) gives its first value or offset
            integer = order + TIFF_INTEGERS[kind]
            found[TIFF_TAGS[tag]] = struct.unpack(integer, value[:struct.calcsize(integer)])[0]
    f.seek(start + struct.calcsize(count_format) + entry_size * count)
    size = struct.calcsize(offset_format)
    following = f.read(size)
    return found, struct.unpack(order + offset_format, following)[0] if len(following) == size else 0


def tiff_pages(path):
    """(width, height, NewSubfileType) of a TIFF's first TIFF_PAGES_READ directories, read from their entries
    alone (at most TIFF_ENTRIES_READ each); [] when the header cannot be read."""
    pages = []
    try:
        with open(path, 'rb') as f:
            order, big, offset = tiff_start(f)
            while offset and len(pages) < TIFF_PAGES_READ:
                f.seek(offset)
                found, offset = tiff_directory(f, order, big, TIFF_ENTRIES_READ)
                pages.append((found.get('width', 0), found.get('height', 0), found.get('subfile_type', 0)))
    except (OSError, struct.error):
        return []
    return pages


def tiff_size(f):
    """The first directory's size, and its largest strip or tile decoded (bits and samples per pixel)."""
    order, big, offset = tiff_start(f)
    f.seek(offset)
    found = tiff_directory(f, order, big)[0]
    if 'width' not in found or 'height' not in found:
        return None
    width, height = found['width'], found['height']
    bits = found.get('bits', 1) if found.get('bits', 1) <= 64 else 16   # an offset: several values, assume 16
    if 'tile_width' in found and 'tile_height' in found:
        width, rows = found['tile_width'], found['tile_height']
    else:
        rows = min(found.get('rows_per_strip', height), height)
    return ImageSize(found['width'], found['height'], width * rows * found.get('samples', 1) * bits // 8)


def heif_size(head):
    """The largest image spatial extent ('ispe') a HEIF file declares; it is decoded whole (about 4 bytes a pixel)."""
    sizes = [struct.unpack('>II', head[at + 8:at + 16]) for at in
             (m.start() for m in re.finditer(b'ispe', head)) if len(head) >= at + 16]
    if not sizes:
        return None
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return ImageSize(width, height, 4 * width * height)


def type_by_name(name):
    """The MIME type a file's name (its extension) says, or None."""
    return mimetypes.guess_type(name)[0]
