"""Names: what a stored file may be called, and the one way derivatives (thumbnails, pyramids, IIIF answers)
are named after their original and read back.

Every name a client sends is checked here before any file-system or store call; every cache name the server,
derivatives.py and migrate.py meet is parsed by `parse_derivative`. Imports nothing of the server's.
"""

import os
import re
import typing

TEMP_PREFIX = '.~wast-'          # Our temporary files and folders; clients may not use such names.


def printable(text):
    """Text for a log line: control characters (C0, C1 and the Unicode line separators) escaped, so a
    request cannot forge lines."""
    return re.sub(r'[\x00-\x1f\x7f-\x9f\u2028\u2029]', lambda m: f'\\x{ord(m.group()):02x}'
                  if ord(m.group()) < 256 else f'\\u{ord(m.group()):04x}', text)


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


CATALOGUE_DIR = '.checksums'     # beside originals/: each original's checksum (on disk), under the original's name
INDEX_DIR = '.sha256'            # beside originals/: <sha256 hex>/<name>, an empty entry per original of that SHA-256
TRASH_DIR = '.trash'             # beside originals/: <id> (a deleted original's bytes) and <id>.json (what it was)
RECORD_FOLDERS = (CATALOGUE_DIR, INDEX_DIR, TRASH_DIR)     # the server's records, never a client's name for a folder


class Identity(typing.NamedTuple):
    """What names an original's current bytes: its path parts, and what changes when they are replaced (on disk
    inode, modification time and size; on S3 the ETag and LastModified). Failures and view sizes are
    remembered under it; a derivative is stored only if its original is still the one it was made from."""
    parts: tuple
    version: tuple


# --- Derivative names -------------------------------------------------------------------------------------------

WEBP_MARK = '_webp'
IIIF_MARK = '_iiif'
THUMBNAIL_ROOT = re.compile(r'(.*)_([0-9]+)(' + WEBP_MARK + ')?', re.DOTALL)
IIIF_ROOT = re.compile('(.*)' + IIIF_MARK + r'((?:,[0-9]{1,9}){6})?', re.DOTALL)


class Derivative(typing.NamedTuple):
    """What a cache name says: whose derivative it is and which. A thumbnail has a scale, a pyramid neither scale
    nor region, an IIIF answer a region (x, y, w, h) and a size (w, h)."""
    source: str
    scale: int | None = None
    webp: bool = False
    region: tuple | None = None
    size: tuple | None = None

    @property
    def kind(self):
        return 'thumbnail' if self.scale is not None else 'tile' if self.region else 'pyramid'


def thumbnail_name(name, scale, webp=False):
    """The upstream cache name of a thumbnail: <root>_<scale><ext>; <root>_<scale>_webp<ext> for the
    one answered to browsers that accept WebP (no upstream name ends so: their scale is digits)."""
    root, ext = os.path.splitext(name)
    return f'{root}_{scale}{WEBP_MARK if webp else ""}{ext}'


def pyramid_name(name):
    """The cache name of an original's IIIF pyramid: <root>_iiif<ext> (a thumbnail's name ends in digits)."""
    root, ext = os.path.splitext(name)
    return f'{root}{IIIF_MARK}{ext}'


def tile_name(name, region, size):
    """The cache name of one IIIF answer cut from the pyramid: <root>_iiif,x,y,w,h,width,height<ext>."""
    root, ext = os.path.splitext(name)
    return f'{root}{IIIF_MARK},{",".join(str(n) for n in (*region, *size))}{ext}'


def parse_derivative(candidate):
    """The Derivative that the cache name `candidate` names (the naming above undone exactly), or None."""
    root, ext = os.path.splitext(candidate)
    match = THUMBNAIL_ROOT.fullmatch(root)
    if match:
        found = Derivative(match.group(1) + ext, int(match.group(2)), bool(match.group(3)))
        if thumbnail_name(found.source, found.scale, found.webp) == candidate:
            return found
    match = IIIF_ROOT.fullmatch(root)
    if match:
        numbers = match.group(2) and tuple(int(n) for n in match.group(2)[1:].split(','))
        found = Derivative(match.group(1) + ext, region=numbers and numbers[:4], size=numbers and numbers[4:])
        made = tile_name(found.source, found.region, found.size) if numbers else pyramid_name(found.source)
        if made == candidate:
            return found
    return None


def derivative_source(candidate):
    """The original name whose derivative `candidate` is (a cache name), or None."""
    parsed = parse_derivative(candidate)
    return parsed and parsed.source


def thumbnail_source(candidate):
    """The original name whose thumbnail cache name `candidate` is, or None."""
    parsed = parse_derivative(candidate)
    return parsed.source if parsed and parsed.kind == 'thumbnail' else None


def is_derivative_of(candidate, name):
    """True when `candidate` is the cache name of one of `name`'s thumbnails, its pyramid or its IIIF answers."""
    return derivative_source(candidate) == name
