"""What every part of the Web Asset Server shares: settings, names, file kinds, durable files.

The storages (DiskStorage in server.py, S3Storage in s3storage.py), the thumbnail engine, the
application (server.py) and the administration command (migrate.py) all build on this module;
it imports none of them. Sections: configuration, names, file kinds, errors, durable files,
the storage interface, answers for stored files, a seekable reader.
"""

import collections
import contextlib
import email.utils
import functools
import heapq
import io
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import shutil
import struct
import threading
import time
import types
import typing

import bottle

import settings

log = logging.getLogger('web_asset_server')

VERSION = '1.1.0'                # This server's release: the capabilities document says it; raise the image tag with it.
HERE = os.path.dirname(os.path.abspath(__file__))
TEMP_PREFIX = '.~wast-'          # Our temporary files and folders; clients may not use such names.
CHUNK = 256 * 1024               # Bytes read or written at a time when streaming.

mimetypes.add_type('image/heic', '.heic')
mimetypes.add_type('image/heif', '.heif')


def printable(text):
    """Text for a log line: control characters (C0, C1 and the Unicode line separators) escaped, so a
    request cannot forge lines."""
    return re.sub(r'[\x00-\x1f\x7f-\x9f\u2028\u2029]', lambda m: f'\\x{ord(m.group()):02x}'
                  if ord(m.group()) < 256 else f'\\u{ord(m.group()):04x}', text)


def refuse(status, reason):
    """Stop the request with a short plain-text answer."""
    raise bottle.HTTPError(status, reason)



###############################################################################
# Configuration ###############################################################
###############################################################################

ENV_ALIASES = {'ATTACHMENT_KEY': 'KEY', 'DEBUG_MODE': 'DEBUG'}
OPTIONAL_TYPES = {'SERVER_PORT': int, 'THUMBNAIL_WORKERS': int, 'TIME_TOLERANCE': int,
                  'COLLECTION_DIRS': json.loads}   # the rest: text
SCALE_LISTS = {'PREGENERATE_SCALE'}   # a number, a JSON list or numbers separated by commas
TEXT_LISTS = {'TRUSTED_PROXIES'}      # a JSON list or words separated by commas
TRUE_WORDS, FALSE_WORDS = {'1', 'true', 'yes', 'on'}, {'0', 'false', 'no', 'off'}


class ConfigError(Exception):
    """A setting that the server cannot start with."""


def parse_setting(name, raw, default):
    """Turn an environment variable's text into the type of the setting's default."""
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in TRUE_WORDS | FALSE_WORDS:
                return text.lower() in TRUE_WORDS
            raise ValueError('expected true or false')
        kind = type(default) if default is not None else OPTIONAL_TYPES.get(name, str)
        if text.lower() in ('', 'none', 'null'):
            return None
        if name in SCALE_LISTS:
            return json.loads(text) if text.startswith('[') else [int(part) for part in text.split(',')]
        if name in TEXT_LISTS:
            return json.loads(text) if text.startswith('[') else [part.strip() for part in text.split(',')]
        if kind in (list, dict, set):
            return json.loads(text)
        return kind(text)
    except ValueError as error:
        raise ConfigError(f'setting {name}: cannot read {raw!r} ({error})') from None


def load_config(overrides=None, environ=None):
    """Settings from settings.py, then environment variables, then overrides (tests)."""
    environ = os.environ if environ is None else environ
    values = {name: getattr(settings, name) for name in dir(settings) if name.isupper()}
    for env_name, name in list(ENV_ALIASES.items()) + [(n, n) for n in values]:
        if env_name in environ:
            values[name] = parse_setting(name, environ[env_name], getattr(settings, name))
    values.update(overrides or {})
    config = types.SimpleNamespace(**values)
    config.BASE_DIR = os.path.abspath(os.path.join(HERE, os.path.expanduser(config.BASE_DIR)))
    config.SERVER_PORT = config.SERVER_PORT or config.PORT
    config.CAN_THUMBNAIL = set(config.CAN_THUMBNAIL or ())
    config.THUMBNAIL_WORKERS = config.THUMBNAIL_WORKERS or os.cpu_count() or 1
    check_config(config)
    return config


def check_config(config):
    """Refuse settings that would let names escape BASE_DIR or make no sense."""
    for name in ('ORIG_DIR', 'THUMB_DIR'):
        if name_problem(getattr(config, name)):
            raise ConfigError(f'setting {name} must be a single folder name')
    if config.TIME_TOLERANCE is None and config.NO_TIME_WINDOW_ACKNOWLEDGED is not True:
        raise ConfigError('setting TIME_TOLERANCE is none, so tokens would never expire: set it to seconds, or set '
                          'NO_TIME_WINDOW_ACKNOWLEDGED to true (see the README)')
    if config.ORIG_DIR == config.THUMB_DIR:
        raise ConfigError('settings ORIG_DIR and THUMB_DIR must name different folders (a thumbnail would '
                          'overwrite an original named like it)')
    if config.COLLECTION_DIRS is not None:
        if not isinstance(config.COLLECTION_DIRS, dict):
            raise ConfigError('setting COLLECTION_DIRS must map collection names to folder names')
        for coll, folder in config.COLLECTION_DIRS.items():
            if not isinstance(folder, str) or name_problem(folder):
                raise ConfigError(f'COLLECTION_DIRS[{coll!r}] must be a single folder name')
    for name in ('PORT', 'SERVER_PORT', 'MAX_UPLOAD_SIZE', 'MAX_THUMBNAIL_SCALE', 'THUMBNAIL_WORKERS',
                 'THUMBNAIL_TIMEOUT', 'THUMBNAIL_MAX_PIXELS', 'THREADS', 'SOCKET_TIMEOUT', 'THUMBNAIL_QUEUE_WAIT',
                 'THUMBNAIL_ADDRESS_SPACE_LIMIT', 'THUMBNAIL_FAILURES_REMEMBERED', 'METADATA_WORKERS',
                 'METADATA_WAIT', 'METADATA_TIMEOUT', 'METADATA_MEMORY_LIMIT', 'METADATA_MAX_READ',
                 'METADATA_MAX_VALUE', 'METADATA_MAX_ANSWER', 'REQUEST_HEAD_TIMEOUT', 'REQUEST_BODY_GRACE',
                 'REQUEST_BODY_MIN_RATE', 'ANSWER_GRACE', 'ANSWER_MIN_RATE', 'MAX_CONNECTIONS',
                 'MAX_CONNECTIONS_PER_CLIENT', 'MAX_REQUESTS_PER_CLIENT', 'THUMBNAIL_OTHER_SCALES',
                 'THUMBNAIL_OTHER_SCALES_ORIGINALS', 'IIIF_MAX_SIZE', 'IIIF_GRANT_SECONDS'):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ConfigError(f'setting {name} must be a whole number above 0')
    config.PREGENERATE_SCALES = pregenerated_scales(config)
    config.THUMBNAIL_CACHE_BOUND = cache_bound(config.THUMBNAIL_CACHE_MAX_BYTES)
    if not isinstance(config.THUMBNAIL_QUEUE, int) or config.THUMBNAIL_QUEUE < 0:
        raise ConfigError('setting THUMBNAIL_QUEUE must be a whole number, 0 or more')
    if config.THREADS < 5:
        raise ConfigError('setting THREADS must be at least 5 (Paste keeps 5 spare threads)')
    if config.PUBLIC_SCHEME not in ('http', 'https'):
        raise ConfigError('setting PUBLIC_SCHEME must be http or https')
    if config.STORAGE not in ('disk', 's3'):
        raise ConfigError('setting STORAGE must be disk or s3')
    if config.STORAGE == 's3' and not config.S3_BUCKET:
        raise ConfigError('setting S3_BUCKET must name a bucket when STORAGE is s3')
    if config.FILE_OFFLOAD not in (None, 'nginx', 'apache'):
        raise ConfigError('setting FILE_OFFLOAD must be none, nginx or apache')
    if config.FILE_OFFLOAD and config.STORAGE != 'disk':
        raise ConfigError('setting FILE_OFFLOAD works with disk storage only')
    config.TRUSTED_NETWORKS = trusted_networks(config.TRUSTED_PROXIES)


def trusted_networks(listed):
    """TRUSTED_PROXIES as address networks (a bare address is a network of one)."""
    if listed is None:
        return ()
    if not isinstance(listed, (list, tuple)):
        raise ConfigError('setting TRUSTED_PROXIES must be a list of addresses or networks, or none')
    try:
        return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in listed if str(item).strip())
    except ValueError as error:
        raise ConfigError(f'setting TRUSTED_PROXIES: {error}') from None


def conversion_threads(config):
    """Threads that may wait for or run conversions at once: THUMBNAIL_WORKERS + THUMBNAIL_QUEUE, leaving
    five of THREADS (at least one) to every other request."""
    return min(config.THUMBNAIL_WORKERS + config.THUMBNAIL_QUEUE, max(1, config.THREADS - 5))


SHARE = re.compile(r'([1-9][0-9]{0,3})%')


def cache_bound(value):
    """(bytes, share of the originals' bytes) that THUMBNAIL_CACHE_MAX_BYTES names: a whole number of bytes (text
    of digits too, from the environment), 'N%', or None for neither."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value, None
    if isinstance(value, str) and SHARE.fullmatch(value):
        return None, int(value[:-1]) / 100
    raise ConfigError("setting THUMBNAIL_CACHE_MAX_BYTES must be a whole number of bytes above 0, a share of the "
                      "originals' bytes such as '100%', or None")


def pregenerated_scales(config):
    """PREGENERATE_SCALE as a list, largest first (each smaller one is then made from it)."""
    chosen = config.PREGENERATE_SCALE
    scales = [] if chosen is None else chosen if isinstance(chosen, list) else [chosen]
    if not all(type(scale) is int and 1 <= scale <= config.MAX_THUMBNAIL_SCALE for scale in scales):
        raise ConfigError(f'setting PREGENERATE_SCALE must be scales from 1 to MAX_THUMBNAIL_SCALE '
                          f'({config.MAX_THUMBNAIL_SCALE}), or none')
    return sorted(set(scales), reverse=True)

###############################################################################
# Names #######################################################################
###############################################################################

def name_problem(name):
    """Why `name` cannot be a stored file's name, or None when it can."""
    if name is None or name == '':
        return 'is missing'
    if name in ('.', '..'):
        return 'may not be . or ..'
    if any(c in name for c in '/\\\0'):
        return 'may not contain /, \\ or NUL'
    if len(name.encode('utf-8', 'surrogatepass')) > 255:
        return 'is longer than 255 bytes'
    if name.startswith(TEMP_PREFIX):
        return f'may not begin with {TEMP_PREFIX}'
    return None


def valid_name(name, field):
    """`name` when it is one safe path component; else a 400 naming the field."""
    problem = name_problem(name)
    if problem:
        refuse(400, f'Bad {field}: it {problem}.')
    return name


def valid_scale(text, bound):
    """The thumbnail scale as an int from 1 to `bound`; else a 400."""
    if text is None or not re.fullmatch(r'[0-9]{1,9}', text) or not 1 <= int(text) <= bound:
        refuse(400, f'Bad scale: it must be a whole number from 1 to {bound}.')
    return int(text)


def thumbnail_name(name, scale, webp=False):
    """The upstream cache name of a thumbnail: <root>_<scale><ext>; <root>_<scale>_webp<ext> for the
    one answered to browsers that accept WebP (no upstream name ends so: their scale is digits)."""
    root, ext = os.path.splitext(name)
    return f'{root}_{scale}{WEBP_MARK if webp else ""}{ext}'


WEBP_MARK = '_webp'


def parse_thumbnail_name(candidate):
    """(original name, scale, webp) of the thumbnail cache name `candidate` (thumbnail_name undone), or None."""
    root, ext = os.path.splitext(candidate)
    match = re.fullmatch(r'(.*)_([0-9]+)(' + WEBP_MARK + ')?', root, re.DOTALL)
    if match is None:
        return None
    source, scale, webp = match.group(1) + ext, int(match.group(2)), bool(match.group(3))
    return (source, scale, webp) if thumbnail_name(source, scale, webp) == candidate else None


def thumbnail_source(candidate):
    """The original name whose thumbnail cache name `candidate` is, or None."""
    parsed = parse_thumbnail_name(candidate)
    return parsed and parsed[0]


IIIF_MARK = '_iiif'
IIIF_DERIVATIVE = re.compile('(.*)' + IIIF_MARK + r'((?:,[0-9]{1,9}){6})?', re.DOTALL)


def pyramid_name(name):
    """The cache name of an original's IIIF pyramid: <root>_iiif<ext> (a thumbnail's name ends in digits)."""
    root, ext = os.path.splitext(name)
    return f'{root}{IIIF_MARK}{ext}'


def tile_name(name, region, size):
    """The cache name of one IIIF answer cut from the pyramid: <root>_iiif,x,y,w,h,width,height<ext>."""
    root, ext = os.path.splitext(name)
    return f'{root}{IIIF_MARK},{",".join(str(n) for n in (*region, *size))}{ext}'


def iiif_source(candidate):
    """The original name whose pyramid or cached IIIF answer `candidate` is, or None."""
    root, ext = os.path.splitext(candidate)
    match = IIIF_DERIVATIVE.fullmatch(root)
    if match is None:
        return None
    source = match.group(1) + ext
    numbers = match.group(2) and [int(n) for n in match.group(2)[1:].split(',')]
    made = tile_name(source, numbers[:4], numbers[4:]) if numbers else pyramid_name(source)
    return source if made == candidate else None


def derivative_source(candidate):
    """The original name whose thumbnail, pyramid or cached IIIF answer `candidate` is (a cache name), or None."""
    return thumbnail_source(candidate) or iiif_source(candidate)


def is_thumbnail_of(candidate, name):
    """True when `candidate` is the cache name of one of `name`'s thumbnails, its pyramid or its IIIF answers."""
    return derivative_source(candidate) == name


###############################################################################
# File kinds ##################################################################
###############################################################################

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
    if head[:4] in (b'II*\0', b'MM\0*'):
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
    return mimetypes.guess_type(name)[0] or sniff_kind(path) or 'application/octet-stream'


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


TIFF_PAGES_READ = 16           # directories read for reduced-resolution pages: a pyramid of 64K px has 16
TIFF_ENTRIES_READ = 64         # entries read of each: the tags looked for are among the lowest numbered


def tiff_directory(f, order, entries=None):
    """The looked-for tags of the directory at f's position (of its first `entries` entries; all: None) and the
    offset of the next directory (0: none)."""
    start, found = f.tell(), {}
    count = struct.unpack(order + 'H', f.read(2))[0]
    for _ in range(count if entries is None else min(count, entries)):
        tag, kind, _count, value = struct.unpack(order + 'HHI4s', f.read(12))
        if tag in TIFF_TAGS and kind in (3, 4):      # a list (BitsPerSample) gives its first value or offset
            found[TIFF_TAGS[tag]] = struct.unpack(order + ('H' if kind == 3 else 'I'), value[:2 if kind == 3 else 4])[0]
    f.seek(start + 2 + 12 * count)
    following = f.read(4)
    return found, struct.unpack(order + 'I', following)[0] if len(following) == 4 else 0


def tiff_pages(path):
    """(width, height, NewSubfileType) of a TIFF's first TIFF_PAGES_READ directories, read from their entries
    alone (at most TIFF_ENTRIES_READ each); [] when the header cannot be read."""
    pages = []
    try:
        with open(path, 'rb') as f:
            order = '<' if f.read(2) == b'II' else '>'
            f.seek(4)
            offset = struct.unpack(order + 'I', f.read(4))[0]
            while offset and len(pages) < TIFF_PAGES_READ:
                f.seek(offset)
                found, offset = tiff_directory(f, order, TIFF_ENTRIES_READ)
                pages.append((found.get('width', 0), found.get('height', 0), found.get('subfile_type', 0)))
    except (OSError, struct.error):
        return []
    return pages


def tiff_size(f):
    """The first directory's size, and its largest strip or tile decoded (bits and samples per pixel)."""
    order = '<' if f.read(2) == b'II' else '>'
    f.seek(4)
    f.seek(struct.unpack(order + 'I', f.read(4))[0])
    found = tiff_directory(f, order)[0]
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


###############################################################################
# Errors ######################################################################
###############################################################################

class ThumbnailError(Exception):
    """A thumbnail that cannot be made; the message is safe to show a client."""

class StorageUnavailable(Exception):
    """The storage cannot be reached or failed; answered with 503."""


class ThumbnailsBusy(Exception):
    """Too many thumbnails are being made to take this one now; answered 503 with Retry-After."""


###############################################################################
# Durable files ###############################################################
###############################################################################

def fsync_folder(folder):
    """Make a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_temp_file(folder):
    """A new temporary file in `folder` (made as needed) that no client name can reach."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{TEMP_PREFIX}{secrets.token_hex(8)}.part')
    return path, open(path, 'xb')


def remove_quietly(path):
    """Remove a file that may already be gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class KeyedLocks:
    """One lock per key, made on first use and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}

    @contextlib.contextmanager
    def __call__(self, key, timeout=None):
        """Hold the key's lock; TimeoutError when it is not free within `timeout` seconds (None: wait)."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f'{key!r} stayed locked')
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]

class OtherScales:
    """The cached thumbnails of scales that are not configured, per original, newest last: each original keeps
    at most `per_original`, and at most `originals` originals are followed (the least recently added to is
    dropped, its thumbnails with it), so no client can fill the cache by asking for every scale."""

    def __init__(self, per_original, originals):
        self.per_original, self.originals = per_original, originals
        self.kept, self.lock = collections.OrderedDict(), threading.Lock()

    def added(self, owner, cache_name):
        """Note a thumbnail just stored for `owner`; return the (owner, cache name)s to remove now."""
        with self.lock:
            names = [kept for kept in self.kept.pop(owner, []) if kept != cache_name] + [cache_name]
            self.kept[owner] = names[-self.per_original:]
            removed = [(owner, old) for old in names[:-self.per_original]]
            while len(self.kept) > self.originals:
                dropped, old_names = self.kept.popitem(last=False)
                removed += [(dropped, old) for old in old_names]
            return removed


class CacheSize:
    """The cached thumbnails' total size against THUMBNAIL_CACHE_MAX_BYTES: unknown until a sweep has counted it,
    then added to as thumbnails are stored; over the bound, a sweep is due, at most one every `sweep_every` seconds.
    A bound given as a `share` of the originals' bytes is set by each sweep, which counts them too."""

    def __init__(self, bound, share=None, sweep_every=60, spare_newer_than=60):
        self.bound, self.share, self.sweep_every, self.spare_newer_than = bound, share, sweep_every, spare_newer_than
        self.total, self.sweeping, self.last_sweep = None, False, -math.inf
        self.lock = threading.Lock()

    def sweep_due(self, added=0):
        """Count `added` bytes; True when a sweep should start now (the caller then runs it and calls swept)."""
        with self.lock:
            if self.total is not None:
                self.total += added
            over = self.total is None or self.bound is None or self.total > self.bound
            if not over or self.sweeping or time.monotonic() - self.last_sweep < self.sweep_every:
                return False
            self.sweeping = True
            return True

    def swept(self, total):
        with self.lock:
            self.total, self.sweeping, self.last_sweep = total, False, time.monotonic()


def sweep_folder(folder, cutoff):
    """Remove our temporary files and folders in `folder` last touched before `cutoff`."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                remove_quietly(entry.path)


def file_identity(path):
    """What changes when a file is replaced or rewritten."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


###############################################################################
# The storage interface #######################################################
###############################################################################

class Layout:
    """What every storage shares: the upstream layout, and making each thumbnail once.

    Keys and paths are <collection folder>/<originals|thumbnails>/<name>, the collection
    folder only when COLLECTION_DIRS maps collections to folders. A storage adds save,
    delete, exists, open, send, send_thumbnail, send_static, two thumbnail steps, the IIIF
    derivatives' steps (original_identity, derivative_is_fresh, store_derivative, send_derivative,
    local_derivative) and the listing (thumbnails, remove_thumbnail, stored_size) that keeps the
    cache within its bounds. The thumbnails folder holds thumbnails, pyramids and IIIF answers alike.
    """

    def __init__(self, config):
        self.collections = config.COLLECTION_DIRS
        self.orig_dir, self.thumb_dir = config.ORIG_DIR, config.THUMB_DIR
        self.staging = config.BASE_DIR
        self.thumbnail_locks = KeyedLocks()
        self.ladder = sorted(config.PREGENERATE_SCALES)      # cached scales a smaller thumbnail may be made from
        self.other_scales = OtherScales(config.THUMBNAIL_OTHER_SCALES, config.THUMBNAIL_OTHER_SCALES_ORIGINALS)
        self.cache_size = any(config.THUMBNAIL_CACHE_BOUND) and CacheSize(*config.THUMBNAIL_CACHE_BOUND)

    def larger_scales(self, scale):
        """The configured scales above `scale`, smallest first: where to look for a source smaller than the original."""
        return [larger for larger in self.ladder if larger > scale]

    def folder_parts(self, coll):
        """The collection's folder as path parts; 404 for a collection COLLECTION_DIRS does not name."""
        if self.collections is None:
            return []
        if coll not in self.collections:
            refuse(404, 'Unknown collection.')
        return [self.collections[coll]]

    def original_parts(self, coll, name):
        return [*self.folder_parts(coll), self.orig_dir, name]

    def thumbnail_parts(self, coll, name, scale, webp=False):
        return self.derivative_parts(coll, thumbnail_name(name, scale, webp))

    def derivative_parts(self, coll, cache_name):
        """Where a cached derivative (a thumbnail, a pyramid, an IIIF answer) of the collection is kept."""
        return [*self.folder_parts(coll), self.thumb_dir, cache_name]

    def owns_thumbnail(self, coll, name):
        """A test for the cache names of `name`'s thumbnails (<root>_<scale><ext>) and IIIF derivatives, and for a
        PDF also the <root>_<scale>.png that older servers made, unless a PNG original of that name owns them."""
        root, ext = os.path.splitext(name)
        owners = [name]
        if ext.lower() == '.pdf' and not self.exists(coll, root + '.png'):
            owners.append(root + '.png')
        return lambda candidate: any(is_thumbnail_of(candidate, owner) for owner in owners)

    def is_static_parts(self, parts):
        """True when a /static/ path names a file in an originals or thumbnails folder."""
        if any(name_problem(part) for part in parts):
            return False
        if self.collections is not None:
            if not parts or parts[0] not in self.collections.values():
                return False
            parts = parts[1:]
        return len(parts) == 2 and parts[0] in (self.orig_dir, self.thumb_dir)

    def staging_folder(self):
        """A local folder for uploads in progress (the collection may not be known yet)."""
        return self.staging

    def sweep_temporaries(self, older_than=3600):
        """Remove temporaries left by a crash (not touched for an hour) in the staging folder."""
        sweep_folder(self.staging, time.time() - older_than)

    def ensure_thumbnail(self, coll, name, scale, thumbnailer, webp=False):
        """Make the thumbnail of `name` at `scale` unless a fresh one is stored; one conversion at a time. What
        found one fresh at once (on disk its stat, which sending it need not take again), else None."""
        if len(thumbnail_name(name, scale, webp).encode('utf-8', 'surrogatepass')) > 255:
            raise ThumbnailError('The file name is too long to name its thumbnail.')
        fresh = self.thumbnail_is_fresh(coll, name, scale, webp)
        if fresh:
            return fresh
        with thumbnailer.admitted(), self.turn_at(coll, name, scale, webp, thumbnailer):   # others wait for it
            for _attempt in range(3):
                if self.thumbnail_is_fresh(coll, name, scale, webp):
                    return
                if self.make_thumbnail(coll, name, scale, thumbnailer, webp):
                    self.keep_within_bounds(coll, name, scale, webp)
                    return
            raise ThumbnailError('The file kept changing while its thumbnail was made.')

    def ensure_answerable_thumbnail(self, coll, name, scale, thumbnailer, webp=False):
        """(what found it fresh, whether it is WebP) for a thumbnail request: a browser that accepts WebP gets the
        plain thumbnail while only that is cached (pregenerated ones are plain), its WebP made in the background,
        so that a first view needs no conversion; else as ensure_thumbnail."""
        if webp and not self.thumbnail_is_fresh(coll, name, scale, webp=True):
            plain = self.thumbnail_is_fresh(coll, name, scale)
            if plain:
                thumbnailer.in_background(functools.partial(self.ensure_thumbnail, coll, name, scale, webp=True),
                                          key=(coll, name, scale, True))
                return plain, False
        return self.ensure_thumbnail(coll, name, scale, thumbnailer, webp), webp

    def keep_within_bounds(self, coll, name, scale, webp):
        """After storing a thumbnail: remove what OtherScales says is too many of other scales, and start a sweep
        in the background when the cache is over THUMBNAIL_CACHE_MAX_BYTES."""
        if scale not in self.ladder:
            for (old_coll, _), cache_name in self.other_scales.added((coll, name), thumbnail_name(name, scale, webp)):
                self.remove_thumbnail(old_coll, cache_name)
        self.count_stored(coll, thumbnail_name(name, scale, webp))

    def count_stored(self, coll, cache_name):
        """Count a derivative just stored against THUMBNAIL_CACHE_MAX_BYTES (a sweep starts when one is due)."""
        if self.cache_size:
            self.start_cache_sweep(self.stored_size(self.derivative_parts(coll, cache_name)))

    def start_cache_sweep(self, added=0):
        """Count `added` bytes of new thumbnail; when a sweep is due, run one in a thread of its own."""
        if self.cache_size.sweep_due(added):
            threading.Thread(target=self.sweep_cache, daemon=True, name='thumbnail-cache-sweep').start()

    def sweep_cache(self):
        """Count the cached thumbnails and, over the bound, remove the least recently made down to 90% of it, those
        of scales not configured first; two listings, holding only what is to be removed."""
        try:
            total = self.bring_within_bound(self.cache_size, self.cache_size.spare_newer_than)[0]
        except Exception:          # a store that failed is counted again at the next sweep
            log.exception('thumbnail cache sweep failed')
            total = None
        self.cache_size.swept(total)

    def bring_within_bound(self, cache, spare_newer_than, dry_run=False):
        """Over the `cache` size's bound (set first from the originals' bytes when it is a share), remove the least
        recently made derivatives down to 90% of it: (the total left, files removed, bytes removed)."""
        total = sum(size for *_, size, _modified in self.cached_thumbnails())
        if cache.share is not None:
            originals = sum(self.originals_bytes(coll) for coll in self.every_collection())
            cache.bound = int(cache.share * originals) or None
            if cache.bound is None and total:
                log.warning('Thumbnails are cached but no originals were counted (a folder not mounted, a wrong S3 '
                            'prefix?): none is removed for THUMBNAIL_CACHE_MAX_BYTES until originals are counted')
        removed = freed = 0
        if cache.bound is not None and total > cache.bound:
            for coll, cache_name, size in self._oldest_covering(total - cache.bound * 9 // 10, spare_newer_than):
                if not dry_run:
                    self.remove_thumbnail(coll, cache_name)
                total, removed, freed = total - size, removed + 1, freed + size
        return total, removed, freed

    def _oldest_covering(self, excess, spare_newer_than):
        """The fewest thumbnails, first in removal order (other scales, then the least recently made), whose sizes
        add up to at least `excess`; never one made in the last `spare_newer_than` seconds (it may be being sent)."""
        newest_first, covered = [], 0          # a heap whose top is the last in removal order
        spared_from = time.time() - spare_newer_than
        for coll, cache_name, size, modified in self.cached_thumbnails():
            if modified > spared_from:
                continue
            parsed = parse_thumbnail_name(cache_name)
            configured = bool(parsed) and parsed[1] in self.ladder
            heapq.heappush(newest_first, (-configured, -modified, coll, cache_name, size))
            covered += size
            while covered - newest_first[0][4] >= excess:
                covered -= heapq.heappop(newest_first)[4]
        return [(coll, cache_name, size) for *_, coll, cache_name, size in newest_first]

    def cached_thumbnails(self):
        """(collection, cache name, size, modification time) of every cached thumbnail, in every collection folder."""
        for coll in self.every_collection():
            for cache_name, size, modified in self.thumbnails(coll):
                yield coll, cache_name, size, modified

    def every_collection(self):
        """One collection name per collection folder (None: the one folder)."""
        return list({folder: coll for coll, folder in (self.collections or {None: None}).items()}.values())

    @contextlib.contextmanager
    def turn_at(self, coll, name, scale, webp, thumbnailer):
        """Hold the lock of one thumbnail; ThumbnailsBusy when a client would wait for it longer than its turn."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.thumbnail_locks((coll, name, scale, webp), thumbnailer.turn_wait()))
            except TimeoutError:
                raise ThumbnailsBusy() from None
            yield


###############################################################################
# Answers for stored files ####################################################
###############################################################################

PASSIVE_TYPES = {'application/pdf', 'application/octet-stream', 'text/plain', 'text/csv',
                 'application/zip', 'application/json'}


def may_run_scripts(mimetype):
    """Whether a browser opening a file of this type might run scripts in it (HTML, SVG, any XML, ...)."""
    major = mimetype.split('/')[0]
    return mimetype == 'image/svg+xml' or not (major in ('image', 'audio', 'video') or mimetype in PASSIVE_TYPES)

ENTITY_TAG = re.compile(r'\s*(?:W/)?("[^"]*")\s*(?:,|$)')


def not_modified(environ, etag, modified):
    """RFC 9110 §13.2.2 for GET/HEAD: If-None-Match (`*` or a list, compared weakly) decides when
    present, and only without it does If-Modified-Since."""
    if 'HTTP_IF_NONE_MATCH' in environ:
        wanted = environ['HTTP_IF_NONE_MATCH'].strip()
        opaque = etag[2:] if etag.startswith('W/') else etag
        return wanted == '*' or opaque in ENTITY_TAG.findall(wanted)
    since = bottle.parse_date(environ.get('HTTP_IF_MODIFIED_SINCE', '').split(';')[0].strip())
    return bool(since) and since >= int(modified)


@functools.lru_cache(maxsize=1024)
def http_date(seconds):
    """An HTTP date (RFC 9110), remembered for the files served most."""
    return email.utils.formatdate(seconds, usegmt=True)


def file_answer(size, etag, modified, mimetype, headers, body_for):
    """The answer to a GET or HEAD of a stored file: 304, 416, one Range (206) or all of it (200).

    Every storage answers through this, so validators and ranges work alike; `body_for(start, end)`
    supplies the bytes. Content that might run scripts is served sandboxed.
    """
    answer = dict(headers or {}, **{
        'Content-Type': mimetype, 'ETag': etag, 'Accept-Ranges': 'bytes', 'X-Content-Type-Options': 'nosniff',
        'Last-Modified': http_date(int(modified))})
    if may_run_scripts(mimetype):
        answer['Content-Security-Policy'] = 'sandbox'
    environ = bottle.request.environ
    if not_modified(environ, etag, modified):
        return bottle.HTTPResponse(status=304, **answer)
    start, end, status = 0, size, 200
    if 'HTTP_RANGE' in environ and environ.get('HTTP_IF_RANGE', etag) in (etag, answer['Last-Modified']):
        ranges = list(bottle.parse_range_header(environ['HTTP_RANGE'], size))
        if not ranges:
            return bottle.HTTPResponse('Requested range not satisfiable.', 416, **{
                'Content-Range': f'bytes */{size}', 'Content-Type': 'text/plain; charset=UTF-8'})
        (start, end), status = ranges[0], 206
        answer['Content-Range'] = f'bytes {start}-{end - 1}/{size}'
    answer['Content-Length'] = str(end - start)
    body = '' if bottle.request.method == 'HEAD' else body_for(start, end)
    return bottle.HTTPResponse(body, status, **answer)



###############################################################################
# A seekable reader ###########################################################
###############################################################################

class SeekableReader(io.RawIOBase):
    """A read-only, seekable file of known size whose bytes come from elsewhere (a store, a pipe).

    A subclass supplies fetch(position, size) -> bytes; reading, seeking and the end are shared.
    """

    def __init__(self, size):
        super().__init__()
        self.size, self.position = size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer):
        if self.position >= self.size or not len(buffer):
            return 0
        data = self.fetch(self.position, min(len(buffer), self.size - self.position))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)
