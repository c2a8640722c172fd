"""IIIF Image API 3.0 and 2.1 at compliance level 2: the request grammar, info.json, identifiers.

Pure code, no pixels and no routes. parse_request turns an image request's region, size, rotation
and quality.format into a Plan (the region of the full image in pixels, the output size, mirroring,
rotation, quality, format) or raises IIIFError carrying the status the specification gives.
tile_grid gives the tiles and sizes offered (is_offered: whether a plan is one of them);
info_document builds info.json and manifest_document a Presentation 3.0 Manifest; identifier_for /
name_for map a stored original to one path segment and back; FORMATS gives each format's content
type and savers.

Numbers, both versions: a pixel value is 1 to 9 ASCII digits; a percentage or a rotation is ASCII
digits with at most one '.' ("MUST consist only of decimal digits and '.'"), at most 9 digits
before it and 10 after it (2.1: "at most 10 decimal digits"). Signs, exponents, NaN, spaces and
other scripts' digits are a 400; no image is a billion pixels wide, so nothing longer is needed.

Limits (info.json's maxWidth, maxHeight, maxArea): `max` (and `^max`) is the largest size within
them that keeps the region's aspect ratio; an explicit size beyond them is refused (3.0: 400, "the
pixel dimensions of the scaled region MUST NOT be ... greater than the server-imposed limits"; 2.1:
404, its error table's "the requested size is greater than the limits specified"). Upscaling (3.0
`^`, 2.1 `sizeAboveFull`) is offered only when maxWidth or maxArea bounds it (3.0: "A server that
supports sizeUpscaling MUST specify maxWidth or maxArea"); otherwise a size needing it is a 501.

Identifiers. Without COLLECTION_DIRS an identifier is the attachment name, percent-encoded as a
path segment when written in a URL (`a b.jpg` -> `a%20b.jpg`). The server reads it decoded (WSGI
decodes the path before any route), so name_for takes the decoded segment; a name holds no '/', so
no decoded slash can appear. With COLLECTION_DIRS it is base64url, unpadded, of the UTF-8 bytes
`<collection> NUL <name>`: names hold no NUL, so the last NUL splits the two for any collection key,
and the identifier is only [A-Za-z0-9_-], which no proxy, percent-decoding or path normalisation
in between can alter. name_for re-encodes what it decoded and refuses any other spelling, so one
attachment has exactly one identifier. An identifier that names no possible attachment is a 404.

Imports run one way: this module imports only names (the shared name rules); server.py builds on it.
"""

import base64
import binascii
import dataclasses
import functools
import math
import re
import typing
from fractions import Fraction
from urllib.parse import quote

from names import name_problem

PROTOCOL = 'http://iiif.io/api/image'
CONTEXT = {3: 'http://iiif.io/api/image/3/context.json', 2: 'http://iiif.io/api/image/2/context.json'}
LEVEL2 = {3: 'level2', 2: 'http://iiif.io/api/image/2/level2.json'}
PRESENTATION_CONTEXT = 'http://iiif.io/api/presentation/3/context.json'


class Format(typing.NamedTuple):
    content_type: str
    vips_saver: str              # the libvips save operation
    magick: str                  # ImageMagick's output format prefix (PNG:out)


FORMATS = {'jpg': Format('image/jpeg', 'jpegsave', 'JPEG'),
           'png': Format('image/png', 'pngsave', 'PNG'),
           'webp': Format('image/webp', 'webpsave', 'WEBP')}
QUALITIES = ('default', 'color', 'gray', 'bitonal')
DEFAULT_QUALITY = 'color'        # what `default` is: the image as it is
EXTRA_FEATURES = {3: ['mirroring', 'rotationArbitrary'],                    # beyond 3/level2.json
                  2: ['mirroring', 'regionSquare', 'rotationArbitrary']}    # beyond 2/level2.json
UPSCALING_FEATURE = {3: 'sizeUpscaling', 2: 'sizeAboveFull'}

PIXELS = re.compile(r'[0-9]{1,9}')
DECIMAL = re.compile(r'(?=\.?[0-9])[0-9]{0,9}(?:\.[0-9]{0,10})?')


class IIIFError(Exception):
    """A request the specification refuses: `status` and a short reason safe to show a client."""

    def __init__(self, status, reason):
        super().__init__(status, reason)
        self.status, self.reason = status, reason


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest output served: maxWidth, maxHeight (maxWidth when only that is given), maxArea; None: no bound."""
    max_width: int = None
    max_height: int = None
    max_area: int = None

    def __post_init__(self):
        for value in (self.max_width, self.max_height, self.max_area):
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError('IIIF limits must be positive whole numbers or None')
        if self.max_height is not None and self.max_width is None:
            raise ValueError('maxWidth MUST be specified if maxHeight is specified')

    @property
    def height(self):
        return self.max_width if self.max_height is None else self.max_height

    @property
    def upscaling(self):
        """Whether sizes above the region are served: only when a limit bounds them."""
        return self.max_width is not None or self.max_area is not None

    def allow(self, w, h):
        return ((self.max_width is None or w <= self.max_width) and (self.height is None or h <= self.height)
                and (self.max_area is None or w * h <= self.max_area))


class Plan(typing.NamedTuple):
    """A resolved image request: crop `region` (x, y, w, h) of the full image, scale it to `size` (w, h),
    mirror it, rotate it clockwise by `rotation` degrees (0 <= rotation < 360), then `quality`, `format`."""
    region: tuple
    size: tuple
    mirror: bool
    rotation: float
    quality: str
    format: str

    @property
    def content_type(self):
        return FORMATS[self.format].content_type


def parse_request(version, region, size, rotation, quality_format, width, height, limits=Limits()):
    """The Plan for an image request to a `width` x `height` image, or IIIFError with the spec's status;
    the latest 4096 plans of text requests remembered, as viewers ask the same tiles again and again."""
    if (all(type(value) is str for value in (region, size, rotation, quality_format))
            and all(type(value) is int for value in (version, width, height))):
        return remembered_plan(version, region, size, rotation, quality_format, width, height, limits)
    return plan_for(version, region, size, rotation, quality_format, width, height, limits)


def plan_for(version, region, size, rotation, quality_format, width, height, limits):
    check_version(version)
    if type(width) is not int or type(height) is not int or width < 1 or height < 1:
        raise ValueError('the image size must be positive whole numbers')
    x, y, w, h = parse_region(text_of(region, 'region'), width, height)
    out = parse_size(version, text_of(size, 'size'), w, h, limits)
    mirror, degrees = parse_rotation(text_of(rotation, 'rotation'))
    quality, fmt = parse_quality_format(text_of(quality_format, 'quality or format'))
    return Plan((x, y, w, h), out, mirror, degrees, quality, fmt)


remembered_plan = functools.lru_cache(maxsize=4096)(plan_for)


def check_version(version):
    if version not in (2, 3):
        raise ValueError('IIIF Image API version must be 2 or 3')


def text_of(value, what):
    """`value` when it is a string; else a 400."""
    if not isinstance(value, str):
        raise bad(what)
    return value


def bad(what):
    return IIIFError(400, f'Bad {what}.')


def pixels(text, what):
    if not PIXELS.fullmatch(text):
        raise bad(what)
    return int(text)


def decimal(text, what):
    """An exact Fraction of a decimal in the grammar above (Fraction alone takes signs, exponents, other digits)."""
    if not DECIMAL.fullmatch(text):
        raise bad(what)
    return Fraction(text)


def half_up(value):
    """`value` (a Fraction or int, >= 0) rounded to the nearest whole number, halves up."""
    value = Fraction(value)
    return (2 * value.numerator + value.denominator) // (2 * value.denominator)


def four(text, number, what):
    parts = text.split(',')
    if len(parts) != 4:
        raise bad(what)
    return [number(part, what) for part in parts]


def parse_region(text, width, height):
    """(x, y, w, h) in pixels: `full`, `square` (centred), `x,y,w,h` or `pct:x,y,w,h`, cropped at the image's edge."""
    if text == 'full':
        return 0, 0, width, height
    if text == 'square':
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    if text.startswith('pct:'):
        px, py, pw, ph = four(text[4:], decimal, 'region')
        x, y, w, h = px * width / 100, py * height / 100, pw * width / 100, ph * height / 100
    else:
        x, y, w, h = four(text, pixels, 'region')
    if w == 0 or h == 0:
        raise IIIFError(400, 'Bad region: its width or height is zero.')
    if x >= width or y >= height:
        raise IIIFError(400, 'Bad region: it lies entirely outside the image.')
    x0, x1 = edges(x, w, width)
    y0, y1 = edges(y, h, height)
    return x0, y0, x1 - x0, y1 - y0


def edges(start, length, full):
    """First and past-last pixel of a span starting inside 0..full, rounded, cropped, at least one pixel."""
    first = min(half_up(start), full - 1)
    return first, max(min(half_up(start + length), full), first + 1)


def parse_size(version, text, rw, rh, limits):
    """The output (w, h) for a `rw` x `rh` region."""
    upscale = version == 3 and text.startswith('^')
    body = text[1:] if upscale else text
    if body == 'max':
        if upscale and limits.upscaling:
            return fit(rw, rh, None, None, limits)
        return fit(rw, rh, rw, rh, limits)
    if body.startswith('!'):
        bw, bh = (pixels(part, 'size') for part in pair(body[1:]))
        if bw == 0 or bh == 0:
            raise IIIFError(400, 'Bad size: it is zero pixels wide or high.')
        if version == 2 and limits.upscaling:
            return fit(rw, rh, bw, bh, limits)
        if not upscale:
            return fit(rw, rh, min(bw, rw), min(bh, rh), limits)
        out = fit(rw, rh, bw, bh, limits)
        return out if limits.upscaling or (out[0] <= rw and out[1] <= rh) else refuse_upscaling(version)
    if version == 2 and body == 'full':
        return explicit(version, rw, rh, False, rw, rh, limits)
    if version == 3 and not upscale and body.startswith('pct:') and decimal(body[4:], 'size') > 100:
        raise IIIFError(400, 'Bad size: pct:n may not exceed 100; prefix it with ^ to upscale.')
    return explicit(version, *requested(body, rw, rh), upscale, rw, rh, limits)


def pair(text):
    parts = text.split(',')
    if len(parts) != 2:
        raise bad('size')
    return parts


def requested(body, rw, rh):
    """The (w, h) that `pct:n`, `w,`, `,h` or `w,h` asks of a `rw` x `rh` region."""
    if body.startswith('pct:'):
        n = decimal(body[4:], 'size')
        return half_up(rw * n / 100), half_up(rh * n / 100)
    text_w, text_h = pair(body)
    if text_w == '':
        h = pixels(text_h, 'size')
        return half_up(Fraction(rw * h, rh)), h
    w = pixels(text_w, 'size')
    if text_h == '':
        return w, half_up(Fraction(rh * w, rw))
    return w, pixels(text_h, 'size')


def explicit(version, w, h, upscale, rw, rh, limits):
    """(w, h) when it may be served: at least a pixel, above the region only as allowed, within the limits."""
    if w < 1 or h < 1:
        raise IIIFError(400, 'Bad size: it is less than one pixel wide or high.')
    if w > rw or h > rh:
        if version == 3 and not upscale:
            raise IIIFError(400, 'Bad size: it is larger than the region; prefix it with ^ to upscale.')
        if not limits.upscaling:
            refuse_upscaling(version)
    if not limits.allow(w, h):
        raise IIIFError(400 if version == 3 else 404, 'Bad size: it is larger than maxWidth, maxHeight or maxArea.')
    return w, h


def refuse_upscaling(version):
    raise IIIFError(501, f'Upscaling ({UPSCALING_FEATURE[version]}) is not supported by this server.')


def fit(rw, rh, bw, bh, limits):
    """The largest (w, h) of a `rw` x `rh` region's aspect ratio within `bw` x `bh` (None: unbounded) and the limits."""
    bw = bound(bw, limits.max_width)
    bh = bound(bh, limits.height)
    if bw is not None and (bh is None or bw * rh <= bh * rw):
        w, h = bw, max(1, half_up(Fraction(rh * bw, rw)))
    elif bh is not None:
        w, h = max(1, half_up(Fraction(rw * bh, rh))), bh
    else:
        w = h = None
    area = limits.max_area
    if area is not None and (w is None or w * h > area):
        aw, ah = within_area(rw, rh, area)
        w, h = (aw, ah) if w is None else (min(w, aw), min(h, ah))
    return (rw, rh) if w is None else (w, h)


def bound(a, b):
    return b if a is None else a if b is None else min(a, b)


def within_area(rw, rh, area):
    """The largest (w, h) near the `rw` x `rh` aspect ratio with w * h <= area, each at least 1 (area >= 1)."""
    if rw >= rh:
        h = max(1, math.isqrt(area * rh // rw))
        return min(max(1, h * rw // rh), area // h), h
    w = max(1, math.isqrt(area * rw // rh))
    return w, min(max(1, w * rh // rw), area // w)


def parse_rotation(text):
    """(mirror, degrees): `n` or `!n`, n from 0 to 360; 360 is 0."""
    mirror = text.startswith('!')
    degrees = decimal(text[1:] if mirror else text, 'rotation')
    if degrees > 360:
        raise IIIFError(400, 'Bad rotation: it must be from 0 to 360 degrees.')
    return mirror, float(degrees % 360)


def parse_quality_format(text):
    """(quality, format) of `quality.format`, `default` read as DEFAULT_QUALITY; unsupported: a 400 (both versions)."""
    parts = text.split('.')
    if len(parts) != 2 or parts[0] not in QUALITIES:
        raise bad('quality')
    if parts[1] not in FORMATS:
        raise IIIFError(400, 'Bad format: this server answers jpg, png and webp.')
    return (DEFAULT_QUALITY if parts[0] == 'default' else parts[0]), parts[1]


@functools.lru_cache(maxsize=1024)
def tile_grid(width, height, tile, limits=Limits()):
    """(tile, scale factors, sizes) to offer for a width x height image: tiles at halving scales down to the one
    where the whole image is a single tile, and the whole image at each of those scales (within the limits)."""
    factors = [1]
    while max(width, height) > tile * factors[-1]:
        factors.append(2 * factors[-1])
    sizes = sorted({(-(-width // f), -(-height // f)) for f in factors})
    return tile, tuple(factors), tuple(size for size in sizes if limits.allow(*size))


def is_offered(plan, width, height, tile, factors, sizes):
    """Whether a plan is one of the tiles or sizes info.json offers, unturned, in colour, as JPEG: what viewers ask."""
    if plan.mirror or plan.rotation or plan.quality != DEFAULT_QUALITY or plan.format != 'jpg':
        return False
    (x, y, w, h), (out_w, out_h) = plan.region, plan.size
    if (x, y, w, h) == (0, 0, width, height) and (out_w, out_h) in sizes:
        return True
    for factor in factors:
        span = tile * factor
        if (x % span == 0 and y % span == 0 and (w, h) == (min(span, width - x), min(span, height - y))
                and (out_w, out_h) == (-(-w // factor), -(-h // factor))):
            return True
    return False


def info_document(version, base_id, width, height, tile_size, scale_factors, sizes, limits=Limits(), extra=None,
                  manifest=None):
    """info.json as a dict. tile_size: an int (square) or (w, h); sizes: (w, h) pairs of the full image;
    extra: further top-level properties (not replacing these); manifest: a 3.0 partOf Manifest's URL."""
    check_version(version)
    tiles = tile_description(version, tile_size, scale_factors, limits)
    size_list = size_descriptions(sizes, width, height, limits)
    if version == 3:
        doc = {'@context': CONTEXT[3], 'id': base_id, 'type': 'ImageService3', 'protocol': PROTOCOL,
               'profile': LEVEL2[3], 'width': width, 'height': height, **limit_properties(limits),
               'tiles': tiles, **size_list, 'extraFormats': ['webp'],
               'extraQualities': ['color', 'gray', 'bitonal'], 'extraFeatures': features(3, limits)}
        if manifest is not None:
            doc['partOf'] = [{'id': manifest, 'type': 'Manifest'}]
    else:
        profile = {'formats': sorted(FORMATS), 'qualities': list(QUALITIES), 'supports': features(2, limits),
                   **limit_properties(limits)}
        doc = {'@context': CONTEXT[2], '@id': base_id, 'protocol': PROTOCOL, 'width': width, 'height': height,
               'profile': [LEVEL2[2], profile], 'tiles': tiles, **size_list}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f'info.json property {key} is set here, not by the caller')
        doc[key] = value
    return doc


def features(version, limits):
    """The features parse_request supports beyond the level 2 profile: declared, as clients may assume no others."""
    return EXTRA_FEATURES[version] + ([UPSCALING_FEATURE[version]] if limits.upscaling else [])


def limit_properties(limits):
    names = (('maxWidth', limits.max_width), ('maxHeight', limits.max_height), ('maxArea', limits.max_area))
    return {name: value for name, value in names if value is not None}


def tile_description(version, tile_size, scale_factors, limits):
    """The `tiles` list: one tile size at the given scale factors, which must be served, so within the limits."""
    tw, th = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    factors = sorted(set(scale_factors))
    if not all(type(n) is int and n >= 1 for n in (tw, th, *factors)) or not factors:
        raise ValueError('tile sizes and scale factors must be positive whole numbers')
    if not limits.allow(tw, th):
        raise ValueError('tiles must be within maxWidth, maxHeight and maxArea')
    tile = {'width': tw, 'height': th, 'scaleFactors': factors} if tw != th else {'width': tw, 'scaleFactors': factors}
    return [tile]


def size_descriptions(sizes, width, height, limits):
    """{'sizes': [...]}, or {} for none: each (w, h) within the image (3.0 serves w,h only so) and within the limits."""
    for w, h in sizes:
        if not (type(w) is int and type(h) is int and 1 <= w <= width and 1 <= h <= height and limits.allow(w, h)):
            raise ValueError('sizes must be within the image and within maxWidth, maxHeight and maxArea')
    return {'sizes': [{'width': w, 'height': h} for w, h in sizes]} if sizes else {}


def manifest_document(manifest_id, service_id, label, size, full_size):
    """A Presentation 3.0 Manifest of one Canvas the size of the image (as shown), painted by its full image at
    `full_size` (what full/max answers), with the 3.0 image service linked."""
    width, height = size
    canvas = f'{manifest_id}/canvas/1'
    body = {'id': f'{service_id}/full/max/0/default.jpg', 'type': 'Image', 'format': 'image/jpeg',
            'width': full_size[0], 'height': full_size[1],
            'service': [{'id': service_id, 'type': 'ImageService3', 'profile': LEVEL2[3]}]}
    painting = {'id': f'{canvas}/annotation/1', 'type': 'Annotation', 'motivation': 'painting',
                'body': body, 'target': canvas}
    return {'@context': PRESENTATION_CONTEXT, 'id': manifest_id, 'type': 'Manifest', 'label': {'none': [label]},
            'items': [{'id': canvas, 'type': 'Canvas', 'width': width, 'height': height, 'label': {'none': [label]},
                       'items': [{'id': f'{canvas}/page/1', 'type': 'AnnotationPage', 'items': [painting]}]}]}


def identifier_for(coll, name, collections):
    """The URL path segment for original `name` of collection `coll` (collections: COLLECTION_DIRS or None)."""
    if not collections:
        return quote(name, safe='')
    if coll not in collections:
        raise ValueError('an identifier names a collection of COLLECTION_DIRS')
    return spelling(coll, name)


def spelling(coll, name):
    raw = coll.encode('utf-8') + b'\0' + name.encode('utf-8')
    return base64.urlsafe_b64encode(raw).rstrip(b'=').decode('ascii')


def spelled_name(identifier, collections):
    """(collection, name) that the decoded path segment `identifier` spells (collection None without
    COLLECTION_DIRS), whether or not the collection is one of them, so that a refusal for want of a token can come
    first and tell nothing of which collections exist; IIIFError 404 when it spells no name."""
    if not isinstance(identifier, str):
        raise unknown()
    if not collections:
        if name_problem(identifier):
            raise unknown()
        return None, identifier
    try:
        text = base64.urlsafe_b64decode(identifier + '=' * (-len(identifier) % 4)).decode('utf-8')
    except (binascii.Error, ValueError):                            # not base64, not ASCII, not UTF-8
        raise unknown() from None
    coll, nul, name = text.rpartition('\0')
    if not nul or name_problem(name):
        raise unknown()
    if spelling(coll, name) != identifier:                        # padding, unused bits: another spelling
        raise unknown()
    return coll, name


def name_for(identifier, collections):
    """(collection, name) that the decoded path segment `identifier` names (collection None without
    COLLECTION_DIRS), or IIIFError 404 when it can name no stored original."""
    coll, name = spelled_name(identifier, collections)
    if collections and coll not in collections:
        raise unknown()
    return coll, name


def unknown():
    return IIIFError(404, 'No such image.')
