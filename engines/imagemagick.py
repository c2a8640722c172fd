"""The ImageMagick and Ghostscript engine: thumbnails (and the first step of pyramids of kinds libvips does not
read), each tool run with file names of our own in a scratch folder, bounded in time, memory, disk and count.

The programs are found once at start and checked by their version text (a stand-in named `convert` earlier on
PATH is passed over); PDFs are rendered by Ghostscript, which Debian's ImageMagick policy leaves to it.
"""

import contextlib
import errno
import functools
import logging
import os
import re
import resource
import secrets
import shutil
import subprocess
import threading
import time
import types
import typing

import sh

from config import ConfigError
from engines.scheduling import EVERY_SCALE, INTERACTIVE, Scheduler
from errors import PassingFailure, ThumbnailError
from kinds import ImageSize, image_size, sniff_kind, tiff_pages
from names import TEMP_PREFIX, Identity

log = logging.getLogger('web_asset_server')
logging.getLogger('sh').setLevel(logging.WARNING)

INPUT_CODERS = {'image/jpeg': 'jpeg', 'image/png': 'png', 'image/gif': 'gif',
                'image/tiff': 'tiff', 'image/heic': 'heic', 'image/heif': 'heic',
                'application/pdf': 'png'}          # PDFs reach ImageMagick as Ghostscript's PNG
OUTPUT_CODERS = {'image/jpeg': 'jpeg', 'image/png': 'png', 'image/gif': 'gif'}  # the rest become PNG
WEBP_QUALITY = 80               # libwebp's quality for thumbnails answered as WebP (transparency kept)
ROOM_NEEDED = 1024 ** 2          # Free bytes below which a failed conversion counts as the disk's fault (507).

PAGE_QUERY = ('(in) (r) file runpdfbegin 1 pdfgetpage dup /CropBox pget not { dup /MediaBox pget pop } if == '
              'dup /Rotate pget { == } { 0 == } ifelse /UserUnit pget { == } { 1 == } ifelse quit')


def executables_named(name: str) -> list[str]:
    """Every executable file `name` stands for: the path itself, or each match on PATH."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(folder, name)
                      for folder in os.environ.get('PATH', '').split(os.pathsep) if folder]
    return [path for path in candidates if os.path.isfile(path) and os.access(path, os.X_OK)]


def version_text(path: str, flag: str) -> str:
    """What a program prints for its version flag ('' when it fails). Run plainly: sh's `_timeout` polls and
    added 0.1 s to each of the four calls of every start."""
    try:
        done = subprocess.run([path, flag], stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ''
    return done.stdout.decode('utf-8', 'replace') if done.returncode == 0 else ''


def is_script(path: str) -> bool:
    """True for an interpreted wrapper (#!), which adds an interpreter start to every call."""
    with open(path, 'rb') as f:
        return f.read(2) == b'#!'


@functools.lru_cache(maxsize=None)
def find_imagemagick(setting: str | None) -> str:
    """The ImageMagick program to run: checked by its -version, a native binary preferred."""
    names = [setting] if setting else ['magick', 'convert']
    found = []
    for name in names:
        for path in executables_named(name):
            if path not in found and 'ImageMagick' in version_text(path, '-version'):
                found.append(path)
    if not found:
        raise ConfigError(
            'ImageMagick was not found (looked for %s). Install it (apt-get install imagemagick), '
            'set IMAGEMAGICK to its path, or set CAN_THUMBNAIL to [] to run without thumbnails.'
            % ' and '.join(names))
    native = [path for path in found if not is_script(path)]
    return (native or found)[0]


@functools.lru_cache(maxsize=None)
def find_ghostscript(setting: str | None) -> str | None:
    """Ghostscript for PDF thumbnails, or None (then PDFs get no thumbnail)."""
    for path in executables_named(setting):
        if re.match(r'\d+\.\d+', version_text(path, '--version')):
            return path
    log.warning('Ghostscript (%s) was not found: PDFs will get no thumbnails.', setting)
    return None


class ImageMagick:
    """Turns a local file into a thumbnail with ImageMagick (Ghostscript for PDFs), in the scheduler's slots."""

    def __init__(self, config: types.SimpleNamespace, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kinds = config.CAN_THUMBNAIL
        self.convert = sh.Command(find_imagemagick(config.IMAGEMAGICK)) if self.kinds else None
        gs = find_ghostscript(config.GHOSTSCRIPT) if 'application/pdf' in self.kinds else None
        self.gs = sh.Command(gs) if gs else None
        self.timeout = config.THUMBNAIL_TIMEOUT
        self.max_pixels = config.THUMBNAIL_MAX_PIXELS
        self.max_held = config.THUMBNAIL_MEMORY_LIMIT
        self.disk_limit = within_hard_limit(resource.RLIMIT_FSIZE, config.THUMBNAIL_DISK_LIMIT)
        self.address_space = within_hard_limit(resource.RLIMIT_AS, config.THUMBNAIL_ADDRESS_SPACE_LIMIT)
        self.limits = ['-limit', 'memory', str(config.THUMBNAIL_MEMORY_LIMIT),
                       '-limit', 'map', str(config.THUMBNAIL_MEMORY_LIMIT),   # mapped pixels are resident too
                       '-limit', 'disk', str(config.THUMBNAIL_DISK_LIMIT),
                       '-limit', 'area', str(config.THUMBNAIL_MAX_PIXELS),
                       '-limit', 'width', '64KP', '-limit', 'height', '64KP',
                       '-limit', 'thread', '1',      # its own time limit, counted in whole seconds,
                       '-limit', 'time', str(config.THUMBNAIL_TIMEOUT + 1)]   # only backs up our timer

    @contextlib.contextmanager
    def converted(self, source: str, scale: int, folder: str, identity: Identity | None = None, webp: bool = False,
                  work: str = INTERACTIVE) -> typing.Iterator[str]:
        """Yield the path of `source`'s thumbnail (WebP if `webp`, unless it is a GIF), made in a scratch folder
        inside `folder` and removed after.

        `identity` names the original's current bytes: a failure is remembered under it and
        answered again without converting.
        """
        self.scheduler.raise_remembered_failure(identity, scale)
        kind = sniff_kind(source)
        size = self.scheduler.remembering(identity, EVERY_SCALE, lambda: self.check_header(source, kind))
        with self.scratch_for(source, folder) as scratch:
            with self.scheduler.slots(work):      # at most THUMBNAIL_WORKERS conversions at once
                self._convert(kind, scale, size, scratch, identity, webp)
            made = os.path.join(scratch, 'out')
            with open(made, 'rb') as out:
                os.fsync(out.fileno())
            yield made

    @staticmethod
    @contextlib.contextmanager
    def scratch_for(source: str, folder: str | None) -> typing.Iterator[str]:
        """A scratch folder of our own inside `folder`, `source` linked in it as `in`; removed after."""
        os.makedirs(folder, exist_ok=True)
        scratch = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(8))
        os.mkdir(scratch)
        try:
            os.symlink(source, os.path.join(scratch, 'in'))
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def check_header(self, source: str, kind: str | None) -> ImageSize | None:
        """The image's size from its header, once its kind, pixels and decoder's memory are within bounds."""
        if kind not in self.kinds or (kind == 'application/pdf' and not self.gs):
            raise ThumbnailError('No thumbnail can be made from this kind of file.')
        size = image_size(source, kind)
        if size and size.width * size.height > self.max_pixels:
            raise ThumbnailError('The image has too many pixels to thumbnail.')
        if size and size.held > self.max_held:
            raise ThumbnailError('The image would need too much memory to thumbnail.')
        return size

    def _convert(self, kind: str, scale: int, size: ImageSize | None, scratch: str, identity: Identity | None,
                 webp: bool = False) -> None:
        """Run the tools with file names of our own (scratch/in -> scratch/out), never a client's."""
        deadline = time.monotonic() + self.timeout
        source = 'in'
        if kind == 'application/pdf':
            render = functools.partial(self.render_page, scratch, scale, deadline)
            self.scheduler.remembering(identity, EVERY_SCALE, render)     # a page that fails does so at every scale
            source = 'page.png'
        hint, page, exact, resize = [], 0, [], ['-thumbnail', f'{scale}x{scale}>']    # a whole image: sampled first
        shrink = kind == 'image/jpeg' and size and jpeg_shrink(size.width, size.height, scale)
        if shrink:
            hint = ['-define', f'jpeg:size={size.width // shrink}x{size.height // shrink}']
            resize = ['-resize', f'{scale}x{scale}>']        # little left to do: the filter alone, no aliasing
        if kind == 'image/tiff' and size:
            page = reduced_page(tiff_pages(os.path.join(scratch, 'in')), scale)
            if page:                     # the whole image's thumbnail size to the pixel, in its stored orientation
                exact, resize = ['-resize', '{}x{}!'.format(*fitted(size.width, size.height, scale))], []
        flatten = [] if kind in OUTPUT_CODERS else ['-colorspace', 'sRGB', '-depth', '8']
        output = [f'{OUTPUT_CODERS.get(kind, "png")}:out']
        if webp and output != ['gif:out']:
            output = ['-quality', str(WEBP_QUALITY), 'webp:out']
        self.scheduler.remembering(identity, scale, lambda: self.run(
            self.convert, *self.limits, *hint, f'{INPUT_CODERS[kind]}:{source}[{page}]', *exact,
            '-auto-orient', *resize, '+repage', *flatten, '-strip', *output, scratch=scratch, deadline=deadline))

    def render_page(self, scratch: str, scale: int, deadline: float) -> None:
        """Ghostscript renders the first page so that its long side is `scale` pixels: a page of its shape
        `scale` points long, at 72 dpi (vector text is drawn at that size, never enlarged from 72 dpi)."""
        width, height = self._page_size(scratch, deadline)
        fit = scale / max(width, height)
        width, height = max(1, width * fit), max(1, height * fit)
        self.run(self.gs, '-dSAFER', '-dBATCH', '-dNOPAUSE', '-dQUIET', '-dNOPROMPT',
                  '-sDEVICE=png16m', '-r72', '-dFirstPage=1', '-dLastPage=1', '-dUseCropBox',
                  f'-dDEVICEWIDTHPOINTS={width:.2f}', f'-dDEVICEHEIGHTPOINTS={height:.2f}', '-dFIXEDMEDIA',
                  '-dPDFFitPage', '-dTextAlphaBits=4', '-dGraphicsAlphaBits=4', '-sOutputFile=page.png',
                  'in', scratch=scratch, deadline=deadline)

    def _page_size(self, scratch: str, deadline: float) -> tuple[float, float]:
        """The first page's size in points as shown (crop box, rotation, user unit), read without rendering."""
        shown = self.run(self.gs, '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-dNODISPLAY', '--permit-file-read=in',
                          '-c', PAGE_QUERY, scratch=scratch, deadline=deadline)
        numbers = [float(n) for n in re.findall(r'-?\d+(?:\.\d*)?(?:[eE]-?\d+)?', shown)]
        if len(numbers) != 6:
            raise ThumbnailError('This file could not be thumbnailed.')
        left, bottom, right, top, rotate, unit = numbers
        width, height = abs(right - left) * unit, abs(top - bottom) * unit
        if not (1 <= width < 1e9 and 1 <= height < 1e9):
            raise ThumbnailError('The page has no size that can be thumbnailed.')
        return (height, width) if rotate % 180 == 90 else (width, height)

    def run(self, program: sh.Command, *args: str, scratch: str, deadline: float) -> str:
        """Run one tool until `deadline` (monotonic) under a file-size and an address-space limit,
        its temporary files in `scratch`; return what it printed.

        The time limit is our own timer: sh's `_timeout` polls and adds 0.1 s to every call.
        """
        try:
            process = program(*args, _cwd=scratch, _tty_out=False, _bg=True, _bg_exc=False,
                              _env=self.environment(scratch), _preexec_fn=self.limit_child)
        except sh.ForkException as error:
            log.warning('could not start %s: %s', program, error)
            raise PassingFailure('This file could not be thumbnailed.') from None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            try:
                process.kill()
            except OSError:         # it ended meanwhile
                pass
        watchdog = threading.Timer(max(0, deadline - time.monotonic()), expire)
        watchdog.start()
        try:
            process.wait()
            return process.stdout.decode('ascii', 'replace')
        except sh.ErrorReturnCode as error:
            if expired.is_set():
                log.warning('thumbnail conversion killed after %s s (THUMBNAIL_TIMEOUT)', self.timeout)
                raise ThumbnailError('Making the thumbnail took too long.') from None
            log.info('thumbnail failed: %s', error.stderr.decode('utf-8', 'replace').strip()[:500])
            if out_of_room(scratch):
                raise OSError(errno.ENOSPC, 'no room for the tool to write its output') from None
            failure = PassingFailure if isinstance(error, sh.SignalException) else ThumbnailError
            raise failure('This file could not be thumbnailed.') from None
        finally:
            watchdog.cancel()

    def limit_child(self) -> None:
        """In a tool's process before it starts: the file-size and address-space limits."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.disk_limit, self.disk_limit))
        resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))

    @staticmethod
    def environment(scratch: str) -> dict:
        """A tool's whole environment: its temporary files in `scratch`, one libvips thread."""
        return {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'LC_ALL': 'C', 'VIPS_CONCURRENCY': '1',
                'MAGICK_TEMPORARY_PATH': scratch, 'TMPDIR': scratch, 'HOME': scratch}

    def usable_kinds(self) -> set[str]:
        """The kinds that get thumbnails, previews and IIIF: CAN_THUMBNAIL, without PDF when Ghostscript is missing."""
        return {kind for kind in self.kinds if kind != 'application/pdf' or self.gs}

    def health(self) -> str:
        """'ok' while the programs found at start are still there, 'off' without thumbnails."""
        if not self.kinds:
            return 'off'
        programs = [self.convert] + ([self.gs] if self.gs else [])
        return 'ok' if all(os.access(str(program), os.X_OK) for program in programs) else 'missing programs'


def fitted(width: int, height: int, scale: int) -> tuple[int, int]:
    """The size of a `scale` thumbnail of a width x height image: its long side `scale`, never enlarged."""
    if max(width, height) <= scale:
        return width, height
    if width >= height:
        return scale, max(1, round(height * scale / width))
    return max(1, round(width * scale / height)), scale


def reduced_page(pages: list, scale: int) -> int:
    """The index of the smallest page of a pyramid TIFF that still makes the `scale` thumbnail of its first page
    (0: the first itself): only a reduced-resolution version counts (NewSubfileType bit 1, the first page's
    shape to a pixel), never another page of a multi-page scan, and never one smaller than the thumbnail."""
    if not pages or not pages[0][0] or not pages[0][1]:
        return 0
    width, height, _ = pages[0]
    needed_width, needed_height = fitted(width, height, scale)
    chosen = 0
    for index, (page_width, page_height, subfile_type) in enumerate(pages[1:], 1):
        if (subfile_type & 1 and needed_width <= page_width < pages[chosen][0] and page_height >= needed_height
                and abs(page_width * height - page_height * width) <= max(width, height)):
            chosen = index
    return chosen


def jpeg_shrink(width: int, height: int, scale: int) -> int | None:
    """The largest factor (8, 4 or 2; None: none) libjpeg may decode a JPEG smaller by for a `scale` thumbnail:
    the decoded image is still twice the thumbnail's size, as vipsthumbnail leaves it (libjpeg's reduced decode
    is a block filter that aliases fine detail when the resize is left little to do), and its sides are exact
    (both divisible), so the thumbnail's size comes out as from the whole image, to the pixel."""
    needed_width, needed_height = fitted(width, height, scale)
    for factor in (8, 4, 2):
        if (width % factor == height % factor == 0 and width // factor >= 2 * needed_width
                and height // factor >= 2 * needed_height):
            return factor
    return None


def out_of_room(folder: str | None) -> bool:
    """True when the file system holding `folder` has (nearly) no space or inodes left: a tool that failed
    then is not remembered as the file's failure, and the client is told 507."""
    room = os.statvfs(folder)
    return room.f_bavail * room.f_frsize < ROOM_NEEDED or (room.f_files and room.f_favail < 16)


def within_hard_limit(which: int, wanted: int) -> int:
    """`wanted` as a resource limit, lowered to the hard limit this process runs under."""
    hard = resource.getrlimit(which)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
