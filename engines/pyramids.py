"""The libvips engine behind IIIF: a tiled, multi-resolution TIFF (a pyramid) per original, and IIIF answers
cut from it.

Each job runs in a child process (`python -m engines.pyramids build|cut ...`, or kept: `serve`), started by the
server's libvips engine (engines/vips.py) under its time, memory and file-size limits and conversion slots, so that
a hostile file
costs one bounded child, never the server. libvips reads only the tiles of the one level a cut needs,
where ImageMagick decodes the whole image for every tile (docs/performance.md has the measurements).

    build <source> <out> jpeg|lossless
                            the source image (JPEG, PNG, GIF, TIFF; other kinds arrive as PNG) as shown
                            (EXIF orientation applied), 8-bit sRGB, in tiles of 256 at halving sizes,
                            stored as JPEG or (for a lossless original, or one with alpha) deflated;
                            prints "<width> <height>"
    cut <pyramid> <out> <plan as JSON>
                            the plan's region of the full image, from the smallest level that still has
                            the pixels its size needs, scaled, mirrored, rotated, in its quality and format
    serve                   the same jobs as messages (engines/framing.py: {"job", "args", "folder"}),
                            one answer each ({"ok", "printed"} or {"ok", "error"}), until the server
                            closes the pipe: a child kept for the next job starts no interpreter and
                            loads no libvips again

Imports run one way: this module imports only engines/framing.py; the server runs it.
"""

import json
import os
import sys

from engines.framing import ChildChannel

TILE = 256                      # the pyramid's own tiles (IIIF tiles of 512 are cut from four of them)
PYRAMID_QUALITY = 85            # JPEG quality of the pyramid's tiles, what answers are cut from (colour at half
                                # resolution, as libvips does below 90; at 90 the pyramid is 3.4 times larger)
SAVE_OPTIONS = {'jpg': ('jpegsave', {'Q': 85, 'optimize_coding': True}),
                'png': ('pngsave', {'compression': 6}),
                'webp': ('webpsave', {'Q': 80})}


def build(pyvips, source, out, compression):
    """Write the pyramid of `source` to `out`; return its full size as "<width> <height>". A truncated image is
    refused: its missing part would be viewed as grey, as if it were the sheet."""
    image = pyvips.Image.new_from_file(source, access='sequential', fail_on='truncated').autorot()
    image = as_srgb(pyvips, image)
    image.tiffsave(out, tile=True, pyramid=True, tile_width=TILE, tile_height=TILE, bigtiff=True,
                   compression='deflate' if compression == 'lossless' or image.hasalpha() else 'jpeg',
                   Q=PYRAMID_QUALITY, strip=True)
    return f'{image.width} {image.height}'


def as_srgb(pyvips, image):
    """8-bit sRGB (with its alpha, if it has one): what every level and every answer is made of."""
    if image.interpretation not in ('srgb', 'b-w') or image.format != 'uchar':
        image = image.colourspace('srgb')
    if image.format != 'uchar':
        image = image.cast('uchar')
    if image.bands in (1, 2):                   # grey (and alpha) stays as it is, in sRGB terms
        return image
    return image if image.bands in (3, 4) else image.extract_band(0, n=3)


def cut(pyvips, pyramid, out, plan):
    """Write the planned answer (JSON) cut from `pyramid` to `out`."""
    plan = json.loads(plan)
    x, y, w, h = plan['region']
    width, height = plan['size']
    full = pyvips.Image.new_from_file(pyramid, page=0)
    level, page = full, 0
    while True:                                 # the smallest level that still has the pixels asked for
        try:
            smaller = pyvips.Image.new_from_file(pyramid, page=page + 1)
        except pyvips.Error:
            break
        if w * smaller.width < width * full.width or h * smaller.height < height * full.height:
            break
        level, page = smaller, page + 1
    sx, sy = level.width / full.width, level.height / full.height
    left, top = int(x * sx), int(y * sy)
    right = min(level.width, max(left + 1, round((x + w) * sx)))
    bottom = min(level.height, max(top + 1, round((y + h) * sy)))
    image = level.crop(left, top, right - left, bottom - top)
    if (image.width, image.height) != (width, height):
        image = image.resize(width / image.width, vscale=height / image.height, kernel='lanczos3')
        image = exactly(image, width, height)
    if plan['mirror']:
        image = image.fliphor()
    image = rotated(image, plan['rotation'], plan['format'])
    image = in_quality(image, plan['quality'])
    saver, options = SAVE_OPTIONS[plan['format']]
    if plan['format'] == 'jpg' and image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    getattr(image, saver)(out, strip=True, **options)
    return ''


def exactly(image, width, height):
    """`image` cropped or extended at its edges to exactly width x height (a resize may round a pixel off)."""
    if image.width > width or image.height > height:
        image = image.crop(0, 0, min(width, image.width), min(height, image.height))
    if image.width < width or image.height < height:
        image = image.embed(0, 0, width, height, extend='copy')
    return image


def rotated(image, degrees, fmt):
    """Turned clockwise; a turn by other than a quarter fits the turned image on white (JPEG) or transparency."""
    quarter = {90.0: 'rot90', 180.0: 'rot180', 270.0: 'rot270'}
    if degrees == 0:
        return image
    if degrees in quarter:
        return getattr(image, quarter[degrees])()
    if fmt != 'jpg' and not image.hasalpha():
        image = image.bandjoin(255)
    background = [255] * image.bands if fmt == 'jpg' else [0] * image.bands
    return image.rotate(degrees, background=background)


def in_quality(image, quality):
    """color as it is; gray as luma (Rec. 601 weights); bitonal as black and white split at the middle."""
    if quality == 'color':
        return image
    alpha = image.extract_band(image.bands - 1) if image.hasalpha() else None
    colour = image.extract_band(0, n=image.bands - 1) if alpha is not None else image
    grey = colour if colour.bands == 1 else colour.recomb([[0.299, 0.587, 0.114]])
    if quality == 'bitonal':
        grey = (grey >= 128).ifthenelse(255, 0)
    grey = grey.cast('uchar')
    return grey.bandjoin(alpha) if alpha is not None else grey


JOBS = {'build': (build, 3), 'cut': (cut, 3)}


def serve(pyvips):
    """Answer jobs from the server (engines/framing.py) until it closes the pipe; a job that ran out of memory ends
    the child after its answer."""
    channel = ChildChannel()                    # nothing libvips or a job prints can reach the server as a message
    channel.send({'ready': True})
    while True:
        job, _data = channel.receive()
        if job is None:
            return
        exhausted = False
        try:
            work, count = JOBS[job['job']]
            if len(job['args']) != count:
                raise ValueError('wrong number of arguments')
            os.chdir(job['folder'])
            answer = {'ok': True, 'printed': work(pyvips, *job['args'])}
        except MemoryError:
            answer, exhausted = {'ok': False, 'error': 'out of memory'}, True
        except (pyvips.Error, OSError, ValueError, KeyError, TypeError) as error:
            answer = {'ok': False, 'error': str(error)[:500]}
        channel.send(answer)
        if exhausted:
            return


def main(arguments):
    import pyvips                               # only in the child: the server never loads libvips
    pyvips.cache_set_max(0)
    if arguments == ['serve']:
        serve(pyvips)
    elif arguments[:1] and arguments[0] in JOBS and len(arguments) == JOBS[arguments[0]][1] + 1:
        print(JOBS[arguments[0]][0](pyvips, *arguments[1:]))
    else:
        sys.exit('usage: python -m engines.pyramids '
                 'build <source> <out> jpeg|lossless | cut <pyramid> <out> <plan> | serve')


if __name__ == '__main__':
    main(sys.argv[1:])
