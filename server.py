"""Web Asset Server for Specify: stores attachments and makes their thumbnails.

Specify 6 and 7 reach this server through views/web_asset_store.xml and sign
each request with an HMAC-MD5 token over a shared key (see README.md). One
Bottle application; run it with `python server.py` (Paste serves it).

Imports run one way: settings.py -> core.py (shared pieces) -> s3storage.py
(object storage) -> front.py (connections before Paste's threads) -> iiif.py (the
IIIF grammar) -> pyramids.py (the libvips engine, run as children) -> server.py
(this, the application) -> migrate.py and derivatives.py (administration
commands: disk <-> S3, thumbnails of stored collections). Sections:
the key, tokens (and viewer grants), thumbnails (and the IIIF engine's
children), disk storage, uploads, metadata, the web application (IIIF
among its routes), start-up.
"""

import collections
import contextlib
import copy
import errno
import functools
import hashlib
import hmac
import inspect
import io
import json
import logging
import os
import posixpath
import queue
import re
import resource
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import bottle
import exifread
import multipart
import sh

from core import (CHUNK, HERE, TEMP_PREFIX, VERSION, ConfigError, KeyedLocks, Layout, SeekableReader, StorageUnavailable,
                  ThumbnailError, ThumbnailsBusy, content_type, conversion_threads, derivative_source, file_answer, file_identity,
                  fsync_folder, image_size, kind_of, load_config, make_temp_file, may_run_scripts, name_problem,
                  printable, pyramid_name, refuse, remove_quietly, sniff_kind, sweep_folder, thumbnail_name,
                  thumbnail_source, tiff_pages, tile_name, valid_name, valid_scale)
from front import FrontedPasteServer, WaitingRoom
import iiif

VIEWS_DIR = os.path.join(HERE, 'views')
MAX_FIELD_SIZE = 64 * 1024       # Largest text field of an upload.

log = logging.getLogger('web_asset_server')
logging.getLogger('exifread').setLevel(logging.CRITICAL)
logging.getLogger('sh').setLevel(logging.WARNING)


###############################################################################
# The key #####################################################################
###############################################################################

def resolve_key(config):
    """The key tokens are checked with: configured, kept in KEY_FILE, or made there now."""
    if config.AUTH_DISABLED:
        log.warning('AUTH_DISABLED is set: anyone who can reach this server may read, '
                    'write and delete attachments.')
        return None
    if config.KEY:
        return config.KEY
    path = config.KEY_FILE or os.path.join(config.BASE_DIR, '.web-asset-server.key')
    return read_kept_key(path) or keep_new_key(path)


def read_kept_key(path):
    """The key kept in `path`, or None when there is no such file. An empty one stops the start: only an
    admin can tell whether Specify knows a key that was lost from it."""
    try:
        with open(path, encoding='utf-8') as kept:
            key = kept.read().strip()
    except FileNotFoundError:
        return None
    if not key:
        raise ConfigError(f'the key file {path} is empty: put the attachment key Specify uses into it, '
                          'or remove the file to have a new key made (then give Specify the new key)')
    log.info('Using the attachment key kept in %s.', path)
    return key


def keep_new_key(path):
    """A new random key, written and synced in full before it appears at `path` (linked, never replacing)."""
    key = secrets.token_urlsafe(32)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f'{TEMP_PREFIX}{secrets.token_hex(8)}.key')
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, 'w', encoding='utf-8') as kept:
            kept.write(key + '\n')
            kept.flush()
            os.fsync(kept.fileno())
        os.link(temp, path)
    except FileExistsError:          # another instance made it first: use theirs
        return read_kept_key(path) or keep_new_key(path)
    except OSError as error:         # e.g. a file system without hard links
        raise ConfigError(f'cannot keep a new key in {path} ({error.strerror or error}): '
                          'set KEY (or ATTACHMENT_KEY), or KEY_FILE to a file on another file system') from None
    finally:
        remove_quietly(temp)
    fsync_folder(folder)
    log.warning('No KEY was configured, so a new random key was made and kept in %s. '
                'Put it into Specify as attachment.key (Specify 6) or ASSET_SERVER_KEY '
                '(Specify 7), or set KEY / ATTACHMENT_KEY to choose your own.', path)
    return key


###############################################################################
# Tokens ######################################################################
###############################################################################

TIMESTAMP = re.compile(r'0|-?[1-9][0-9]{0,19}')    # canonical: as str(int) writes it, ASCII digits only


def make_token(key, name, timestamp=None):
    """A token as clients make it: hex HMAC-MD5 of str(ts) + name, then ':ts'."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(key.encode('utf-8'), f'{timestamp}{name}'.encode('utf-8'), hashlib.md5)
    return f'{digest.hexdigest()}:{timestamp}'


def token_problem(key, token, name, started, tolerance):
    """Why `token` does not sign `name` at time `started`, or None when it does."""
    if key is None:
        return None
    if not token:
        return 'Missing token.'
    digest, _, timestamp = token.rpartition(':')
    if not digest or not TIMESTAMP.fullmatch(timestamp):
        return 'Malformed token.'
    if tolerance is not None and abs(started - int(timestamp)) >= tolerance:
        return 'Token expired: check the clocks of client and server.'
    expected = make_token(key, name or '', timestamp).partition(':')[0]
    if not hmac.compare_digest(expected.encode(), digest.encode('utf-8', 'replace')):
        return 'Bad token.'
    return None


class ReadTokens:
    """Tokens presented for reading, until their window ends (at most `most`, the oldest forgotten first): a
    token that went into a URL, a browser's history or a proxy's log to read a file cannot then replace or delete
    it. Specify mints a fresh token for every write, so only a write in the very second of a read of the same
    name (the same token) is refused."""

    def __init__(self, most):
        self.most, self.tokens, self.lock = most, collections.OrderedDict(), threading.Lock()

    def note(self, token, now, tolerance):
        """Remember a token a request read with (until it expires; with no window, until forgotten)."""
        timestamp = int(token.rpartition(':')[2])
        with self.lock:
            self.tokens[token] = None if tolerance is None else timestamp + tolerance
            self.tokens.move_to_end(token)
            while self.tokens and (len(self.tokens) > self.most or self.expired(next(iter(self.tokens)), now)):
                self.tokens.popitem(last=False)

    def expired(self, token, now):
        ends = self.tokens[token]
        return ends is not None and ends <= now

    def read_with(self, token):
        with self.lock:
            return token in self.tokens


GRANT = re.compile(r'([0-9]{1,12})\.([0-9a-f]{32})')
GRANT_STEP = 60                  # grants are minted to the next whole minute, so one minute's tiles share URLs


def make_grant(key, coll, name, expires):
    """A viewer's grant for one original until `expires` (epoch seconds): '<expires>.<HMAC-SHA256, 32 hex>'."""
    message = f'iiif-grant\0{expires}\0{coll or ""}\0{name}'.encode('utf-8', 'surrogatepass')
    return f'{expires}.{hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()[:32]}'


def new_grant(key, coll, name, now, lifetime):
    expires = -(-(int(now) + lifetime) // GRANT_STEP) * GRANT_STEP
    return make_grant(key, coll, name, expires)


def grant_problem(key, grant, coll, name, now, lifetime):
    """Why `grant` does not let a viewer see this original now, or None when it does."""
    if key is None:
        return None
    match = GRANT.fullmatch(grant)
    if not match:
        return 'Malformed viewer grant.'
    expires = int(match.group(1))
    if not now < expires <= now + lifetime + GRANT_STEP:
        return 'The viewer grant has expired: open the image again.'
    if not hmac.compare_digest(make_grant(key, coll, name, expires).encode(), grant.encode()):
        return 'Bad viewer grant.'
    return None


###############################################################################
# Thumbnails ##################################################################
###############################################################################


INPUT_CODERS = {'image/jpeg': 'jpeg', 'image/png': 'png', 'image/gif': 'gif',
                'image/tiff': 'tiff', 'image/heic': 'heic', 'image/heif': 'heic',
                'application/pdf': 'png'}          # PDFs reach ImageMagick as Ghostscript's PNG
OUTPUT_CODERS = {'image/jpeg': 'jpeg', 'image/png': 'png', 'image/gif': 'gif'}  # the rest become PNG
WEBP_QUALITY = 80               # libwebp's quality for thumbnails answered as WebP (transparency kept)
IIIF_KINDS = {'image/jpeg', 'image/png', 'image/gif', 'image/tiff', 'image/heic', 'image/heif', 'application/pdf'}
VIPS_KINDS = {'image/jpeg', 'image/png', 'image/gif', 'image/tiff'}     # read by libvips itself; others as PNG first
LOSSLESS_KINDS = {'image/png', 'image/gif'}    # their pyramids stay lossless (deflate); the rest are stored as JPEG
PYRAMIDS = os.path.join(HERE, 'pyramids.py')   # the libvips engine, run as a child per job
PYRAMID = 'pyramid'             # what a pyramid's failure is remembered as (a thumbnail's is its scale)
PDF_VIEW_SIZE = 4096            # long side in pixels of a PDF's first page as IIIF serves it (about 350 dpi for A4)
IIIF_TILE = 512                 # the tile size info.json offers
IIIF_CACHING = {False: 'public, max-age=86400',     # IIIF image answers: a replaced original shows within a day
                True: 'private, max-age=3600'}     # with REQUIRE_KEY_FOR_GET: never in a shared cache


def executables_named(name):
    """Every executable file `name` stands for: the path itself, or each match on PATH."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(folder, name)
                      for folder in os.environ.get('PATH', '').split(os.pathsep) if folder]
    return [path for path in candidates if os.path.isfile(path) and os.access(path, os.X_OK)]


def version_text(path, flag):
    """What a program prints for its version flag ('' when it fails). Run plainly: sh's `_timeout` polls and
    added 0.1 s to each of the four calls of every start."""
    try:
        done = subprocess.run([path, flag], stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ''
    return done.stdout.decode('utf-8', 'replace') if done.returncode == 0 else ''


def is_script(path):
    """True for an interpreted wrapper (#!), which adds an interpreter start to every call."""
    with open(path, 'rb') as f:
        return f.read(2) == b'#!'


@functools.lru_cache(maxsize=None)
def find_imagemagick(setting):
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
def find_ghostscript(setting):
    """Ghostscript for PDF thumbnails, or None (then PDFs get no thumbnail)."""
    for path in executables_named(setting):
        if re.match(r'\d+\.\d+', version_text(path, '--version')):
            return path
    log.warning('Ghostscript (%s) was not found: PDFs will get no thumbnails.', setting)
    return None


INTERACTIVE, BACKGROUND = 'interactive', 'background'
ROOM_NEEDED = 1024 ** 2          # Free bytes below which a failed conversion counts as the disk's fault (507).
RETRY_AFTER = 5                  # Seconds a client told 503 (conversions busy, storage unavailable) is asked to wait.
KEYED_JOBS_QUEUED = 500          # Background jobs asked for by views (browsers' WebPs) queued at once: half the backlog.
PAGE_QUERY = ('(in) (r) file runpdfbegin 1 pdfgetpage dup /CropBox pget not { dup /MediaBox pget pop } if == '
              'dup /Rotate pget { == } { 0 == } ifelse /UserUnit pget { == } { 1 == } ifelse quit')


class Admission:
    """At most `most` interactive requests from asking for a conversion to its end; more get ThumbnailsBusy at once.

    This bounds the threads that wait for conversions (for a slot, or for another request's
    conversion of the same thumbnail), so the rest of THREADS keep serving every other request.
    """

    def __init__(self, most):
        self.most, self.now, self.lock = most, 0, threading.Lock()

    @contextlib.contextmanager
    def __call__(self, work):
        if work == BACKGROUND:          # bounded by its own backlog
            yield
            return
        with self.lock:
            if self.now >= self.most:
                raise ThumbnailsBusy()
            self.now += 1
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1


class ConversionSlots:
    """THUMBNAIL_WORKERS conversion slots, shared by two classes of work.

    Interactive work (a client waits) waits at most `wait` seconds and goes ahead of background
    work; background work waits as long as it must and never holds every slot (unless there is
    only one).
    """

    def __init__(self, workers, wait):
        self.workers, self.wait = workers, wait
        self.background_share = max(1, workers - 1)
        self.condition = threading.Condition()
        self.running = {INTERACTIVE: 0, BACKGROUND: 0}
        self.waiting = {INTERACTIVE: 0, BACKGROUND: 0}

    @contextlib.contextmanager
    def __call__(self, work):
        """Hold a conversion slot; ThumbnailsBusy when interactive work waited THUMBNAIL_QUEUE_WAIT in vain."""
        with self.condition:
            self.waiting[work] += 1
            try:
                if not self.condition.wait_for(lambda: self._may_start(work),
                                               self.wait if work == INTERACTIVE else None):
                    raise ThumbnailsBusy()
            finally:
                self.waiting[work] -= 1
            self.running[work] += 1
        try:
            yield
        finally:
            with self.condition:
                self.running[work] -= 1
                self.condition.notify_all()

    def _may_start(self, work):
        free = self.workers - sum(self.running.values())
        if work == INTERACTIVE:
            return free > 0
        return free > 0 and not self.waiting[INTERACTIVE] and self.running[BACKGROUND] < self.background_share


class FailureMemory:
    """The reasons of recent failed conversions by (original's identity, scale), the oldest forgotten first.

    An identity is (the original's path parts, what changes when its bytes are replaced: on disk
    inode, mtime and size; on S3 ETag and LastModified). An upload or delete here forgets the
    original's failures; a change by another server sharing the bucket changes the identity.
    Scale None stands for a failure at every scale (the file's kind, header or page).
    """

    def __init__(self, entries):
        self.entries, self.reasons, self.lock = entries, collections.OrderedDict(), threading.Lock()

    def reason(self, identity, scale):
        with self.lock:
            return self.reasons.get((identity, None)) or self.reasons.get((identity, scale))

    def remember(self, identity, scale, reason):
        with self.lock:
            self.reasons[(identity, scale)] = reason
            self.reasons.move_to_end((identity, scale))
            while len(self.reasons) > self.entries:
                self.reasons.popitem(last=False)

    def forget(self, parts):
        """Forget the failures of the original at these path parts (it was replaced or deleted)."""
        with self.lock:
            for key in [key for key in self.reasons if key[0][0] == parts]:
                del self.reasons[key]


class PassingFailure(ThumbnailError):
    """A tool could not start, or was killed by another (the kernel's out-of-memory killer): worth trying again."""


class Thumbnailer:
    """Turns a local file into a thumbnail with ImageMagick (Ghostscript for PDFs), bounded in time, memory and count."""
    work = INTERACTIVE

    def __init__(self, config):
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
                       '-limit', 'map', str(2 * config.THUMBNAIL_MEMORY_LIMIT),
                       '-limit', 'disk', str(config.THUMBNAIL_DISK_LIMIT),
                       '-limit', 'area', str(config.THUMBNAIL_MAX_PIXELS),
                       '-limit', 'width', '64KP', '-limit', 'height', '64KP',
                       '-limit', 'thread', '1',      # its own time limit, counted in whole seconds,
                       '-limit', 'time', str(config.THUMBNAIL_TIMEOUT + 1)]   # only backs up our timer
        self.admission = Admission(conversion_threads(config))
        self.queue_wait = config.THUMBNAIL_QUEUE_WAIT
        self.slots = ConversionSlots(config.THUMBNAIL_WORKERS, self.queue_wait)
        self.failures = FailureMemory(config.THUMBNAIL_FAILURES_REMEMBERED)
        self.backlog = queue.Queue(maxsize=1000)
        self.queued_keys, self.queued_lock = set(), threading.Lock()
        self.background = None
        self.engine = EngineChildren(self, config.THUMBNAIL_WORKERS, config.BASE_DIR)

    def admitted(self):
        """Held by a request from before it waits for another's conversion of the same thumbnail to its end."""
        return self.admission(self.work)

    def turn_wait(self):
        """Seconds this work may wait for another's conversion of the same thumbnail (which may itself be
        background work waiting for a slot); None: as long as it takes."""
        return None if self.work == BACKGROUND else self.queue_wait

    def raise_remembered_failure(self, identity, scale):
        """ThumbnailError with the reason of an earlier failure of these bytes at this scale, if any."""
        reason = identity is not None and self.failures.reason(identity, scale)
        if reason:
            raise ThumbnailError(reason)

    @contextlib.contextmanager
    def converted(self, source, scale, folder, identity=None, webp=False):
        """Yield the path of `source`'s thumbnail (WebP if `webp`, unless it is a GIF), made in a scratch folder
        inside `folder` and removed after.

        `identity` names the original's current bytes: a failure is remembered under it and
        answered again without converting.
        """
        self.raise_remembered_failure(identity, scale)
        kind = sniff_kind(source)
        size = self._remembering(identity, None, lambda: self._check_header(source, kind))
        with self.scratch_for(source, folder) as scratch:
            with self.slots(self.work):      # at most THUMBNAIL_WORKERS conversions at once
                self._convert(kind, scale, size, scratch, identity, webp)
            made = os.path.join(scratch, 'out')
            with open(made, 'rb') as out:
                os.fsync(out.fileno())
            yield made

    @staticmethod
    @contextlib.contextmanager
    def scratch_for(source, folder):
        """A scratch folder of our own inside `folder`, `source` linked in it as `in`; removed after."""
        os.makedirs(folder, exist_ok=True)
        scratch = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(8))
        os.mkdir(scratch)
        try:
            os.symlink(source, os.path.join(scratch, 'in'))
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @contextlib.contextmanager
    def pyramid_built(self, source, folder, identity):
        """Yield (path, (width, height) as shown) of the IIIF pyramid of `source` made by libvips in a child
        (HEIC through ImageMagick, a PDF's first page through Ghostscript, as PNG first); a failure is remembered
        under `identity`, so a corrupt original costs one attempt, not one per tile."""
        self.raise_remembered_failure(identity, PYRAMID)
        kind = sniff_kind(source)
        if kind not in IIIF_KINDS or kind not in self.kinds:
            self._remembering(identity, PYRAMID, raise_unviewable)
        self._remembering(identity, PYRAMID, lambda: self._check_header(source, kind))
        with self.scratch_for(source, folder) as scratch:
            with self.slots(self.work):
                deadline = time.monotonic() + self.timeout
                shown = self._remembering(identity, PYRAMID, lambda: self._build(kind, scratch, deadline)).split()
            if len(shown) != 2 or not all(part.isdigit() for part in shown):
                self._remembering(identity, PYRAMID, raise_unviewable)
            made = os.path.join(scratch, 'pyramid')
            with open(made, 'rb') as out:
                os.fsync(out.fileno())
            yield made, (int(shown[0]), int(shown[1]))

    def _build(self, kind, scratch, deadline):
        """Run the tools that make scratch/pyramid from scratch/in; return what the builder printed."""
        source = 'in'
        if kind == 'application/pdf':
            self._render_page(scratch, PDF_VIEW_SIZE, deadline)
            source = 'page.png'
        elif kind not in VIPS_KINDS:
            self._run(self.convert, *self.limits, f'{INPUT_CODERS[kind]}:in[0]', '-auto-orient', '-colorspace',
                      'sRGB', '-depth', '8', '-strip', 'png:whole.png', scratch=scratch, deadline=deadline)
            source = 'whole.png'
        compression = 'lossless' if kind in LOSSLESS_KINDS else 'jpeg'
        return self.engine.run('build', [source, 'pyramid', compression], scratch, deadline)

    @contextlib.contextmanager
    def iiif_cut(self, pyramid, plan, folder):
        """Yield the path of the answer an IIIF plan asks, cut from a pyramid by libvips in a child, in a
        conversion slot like a thumbnail, removed after; the caller holds admitted()."""
        job = json.dumps({'region': plan.region, 'size': plan.size, 'mirror': plan.mirror,
                          'rotation': plan.rotation, 'quality': plan.quality, 'format': plan.format})
        with self.scratch_for(pyramid, folder) as scratch:
            with self.slots(self.work):
                self.engine.run('cut', ['in', 'out', job], scratch, time.monotonic() + self.timeout)
            yield os.path.join(scratch, 'out')

    def _check_header(self, source, kind):
        """The image's size from its header, once its kind, pixels and decoder's memory are within bounds."""
        if kind not in self.kinds or (kind == 'application/pdf' and not self.gs):
            raise ThumbnailError('No thumbnail can be made from this kind of file.')
        size = image_size(source, kind)
        if size and size.width * size.height > self.max_pixels:
            raise ThumbnailError('The image has too many pixels to thumbnail.')
        if size and size.held > self.max_held:
            raise ThumbnailError('The image would need too much memory to thumbnail.')
        return size

    def _remembering(self, identity, scale, step):
        """Run one step of a conversion; remember its failure (unless it may pass next time)."""
        try:
            return step()
        except PassingFailure:
            raise
        except ThumbnailError as error:
            if identity is not None:
                self.failures.remember(identity, scale, str(error))
            raise

    def _convert(self, kind, scale, size, scratch, identity, webp=False):
        """Run the tools with file names of our own (scratch/in -> scratch/out), never a client's."""
        deadline = time.monotonic() + self.timeout
        source = 'in'
        if kind == 'application/pdf':
            render = functools.partial(self._render_page, scratch, scale, deadline)
            self._remembering(identity, None, render)     # a page that fails does so at every scale
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
        self._remembering(identity, scale, lambda: self._run(
            self.convert, *self.limits, *hint, f'{INPUT_CODERS[kind]}:{source}[{page}]', *exact,
            '-auto-orient', *resize, '+repage', *flatten, '-strip', *output, scratch=scratch, deadline=deadline))

    def _render_page(self, scratch, scale, deadline):
        """Ghostscript renders the first page so that its long side is `scale` pixels: a page of its shape
        `scale` points long, at 72 dpi (vector text is drawn at that size, never enlarged from 72 dpi)."""
        width, height = self._page_size(scratch, deadline)
        fit = scale / max(width, height)
        width, height = max(1, width * fit), max(1, height * fit)
        self._run(self.gs, '-dSAFER', '-dBATCH', '-dNOPAUSE', '-dQUIET', '-dNOPROMPT',
                  '-sDEVICE=png16m', '-r72', '-dFirstPage=1', '-dLastPage=1', '-dUseCropBox',
                  f'-dDEVICEWIDTHPOINTS={width:.2f}', f'-dDEVICEHEIGHTPOINTS={height:.2f}', '-dFIXEDMEDIA',
                  '-dPDFFitPage', '-dTextAlphaBits=4', '-dGraphicsAlphaBits=4', '-sOutputFile=page.png',
                  'in', scratch=scratch, deadline=deadline)

    def _page_size(self, scratch, deadline):
        """The first page's size in points as shown (crop box, rotation, user unit), read without rendering."""
        shown = self._run(self.gs, '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-dNODISPLAY', '--permit-file-read=in',
                          '-c', PAGE_QUERY, scratch=scratch, deadline=deadline)
        numbers = [float(n) for n in re.findall(r'-?\d+(?:\.\d*)?(?:[eE]-?\d+)?', shown)]
        if len(numbers) != 6:
            raise ThumbnailError('This file could not be thumbnailed.')
        left, bottom, right, top, rotate, unit = numbers
        width, height = abs(right - left) * unit, abs(top - bottom) * unit
        if not (1 <= width < 1e9 and 1 <= height < 1e9):
            raise ThumbnailError('The page has no size that can be thumbnailed.')
        return (height, width) if rotate % 180 == 90 else (width, height)

    def _run(self, program, *args, scratch, deadline):
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

        def expire():
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

    def limit_child(self):
        """In a tool's process before it starts: the file-size and address-space limits."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.disk_limit, self.disk_limit))
        resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))

    @staticmethod
    def environment(scratch):
        """A tool's whole environment: its temporary files in `scratch`, one libvips thread."""
        return {'PATH': os.environ.get('PATH', '/usr/bin:/bin'), 'LC_ALL': 'C', 'VIPS_CONCURRENCY': '1',
                'MAGICK_TEMPORARY_PATH': scratch, 'TMPDIR': scratch, 'HOME': scratch}

    def usable_kinds(self):
        """The kinds that get thumbnails, previews and IIIF: CAN_THUMBNAIL, without PDF when Ghostscript is missing."""
        return {kind for kind in self.kinds if kind != 'application/pdf' or self.gs}

    def health(self):
        """'ok' while the programs found at start are still there, 'off' without thumbnails."""
        if not self.kinds:
            return 'off'
        programs = [self.convert] + ([self.gs] if self.gs else [])
        return 'ok' if all(os.access(str(program), os.X_OK) for program in programs) else 'missing programs'

    def in_background(self, job, key=None):
        """Queue job(thumbnailer) (a thumbnail to make) as background work; never waits, drops it when 1000 wait.
        A job with a `key` (a browser's WebP) is queued once until it has run, and such jobs take at most half the
        backlog, so that views never crowd out the pregeneration of uploads."""
        if self.background is None:
            self.background = threading.Thread(target=self._work_backlog, daemon=True,
                                               name='thumbnail-pregeneration')
            self.background.start()
        with self.queued_lock:
            if key is not None and (key in self.queued_keys or len(self.queued_keys) >= KEYED_JOBS_QUEUED):
                return
            try:
                self.backlog.put_nowait((key, job))
            except queue.Full:
                return
            if key is not None:
                self.queued_keys.add(key)

    def as_background(self):
        """This thumbnailer for background work: the same slots and failures, behind interactive work."""
        view = copy.copy(self)
        view.work = BACKGROUND
        return view

    def _work_backlog(self):
        """Work the backlog for the server's lifetime: a job's failure is that job's, never the worker's end."""
        while True:
            key, job = self.backlog.get()
            try:
                job(self.as_background())
            except (ThumbnailError, ThumbnailsBusy, StorageUnavailable, OSError, bottle.HTTPError):
                pass
            except Exception:
                log.exception('pregeneration failed')
            finally:
                with self.queued_lock:
                    self.queued_keys.discard(key)


class EngineChildren:
    """pyramids.py children that stay for the next job (starting one costs 50 ms of interpreter and libvips),
    at most `workers` kept idle. Each runs under the thumbnailer's limits; one that overruns its deadline is
    killed, one that fails or ends is not used again, and each is replaced after `jobs_per_child` jobs."""
    jobs_per_child = 200

    def __init__(self, thumbnailer, workers, folder):
        self.thumbnailer, self.workers, self.folder = thumbnailer, workers, folder
        self.idle, self.lock = [], threading.Lock()

    def run(self, job, args, scratch, deadline):
        """What the job printed; ThumbnailError when it fails, ends or overruns the deadline."""
        child = self._child()
        try:
            os.write(child.stdin.fileno(), json.dumps({'job': job, 'args': args, 'folder': scratch}).encode() + b'\n')
            answer = json.loads(read_line(child.stdout.fileno(), deadline))
        except TimeoutError:
            self._end(child)
            log.warning('IIIF %s killed after %s s (THUMBNAIL_TIMEOUT)', job, self.thumbnailer.timeout)
            raise ThumbnailError('Making the image took too long.') from None
        except (OSError, ValueError):
            self._end(child)
            failure = PassingFailure if child.returncode == -signal.SIGKILL else ThumbnailError   # the OOM killer
            raise failure('This file could not be viewed.') from None
        child.jobs += 1
        with self.lock:
            if answer.get('ok') and child.jobs < self.jobs_per_child and len(self.idle) < self.workers:
                self.idle.append(child)
                child = None
        if child is not None:
            self._end(child)
        if not answer.get('ok'):
            log.info('IIIF %s failed: %s', job, printable(str(answer.get('error', '')))[:500])
            raise ThumbnailError('This file could not be viewed.')
        return answer.get('printed', '')

    def _child(self):
        """An idle child still alive, or a new one (libvips is loaded by its first job)."""
        with self.lock:
            while self.idle:
                child = self.idle.pop()
                if child.poll() is None:
                    return child
        try:
            child = subprocess.Popen([sys.executable, PYRAMIDS, 'serve'], cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.thumbnailer.environment(self.folder),
                                     preexec_fn=self.thumbnailer.limit_child, bufsize=0)
        except OSError as error:
            log.warning('could not start the IIIF engine: %s', error)
            raise PassingFailure('This file could not be viewed.') from None
        os.set_blocking(child.stdout.fileno(), False)
        child.jobs = 0
        return child

    @staticmethod
    def _end(child):
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def read_line(descriptor, deadline):
    """One line from a non-blocking pipe before the deadline (TimeoutError; OSError when it closes first)."""
    data = bytearray()
    while not data.endswith(b'\n'):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            raise TimeoutError()
        try:
            chunk = os.read(descriptor, 64 * 1024)
        except BlockingIOError:
            continue
        if not chunk:
            raise OSError('the engine ended without an answer')
        data += chunk
    return bytes(data)


def raise_unviewable():
    raise ThumbnailError('This file is not an image that can be viewed.')


def fitted(width, height, scale):
    """The size of a `scale` thumbnail of a width x height image: its long side `scale`, never enlarged."""
    if max(width, height) <= scale:
        return width, height
    if width >= height:
        return scale, max(1, round(height * scale / width))
    return max(1, round(width * scale / height)), scale


def reduced_page(pages, scale):
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


def jpeg_shrink(width, height, scale):
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


def out_of_room(folder):
    """True when the file system holding `folder` has (nearly) no space or inodes left: a tool that failed
    then is not remembered as the file's failure, and the client is told 507."""
    room = os.statvfs(folder)
    return room.f_bavail * room.f_frsize < ROOM_NEEDED or (room.f_files and room.f_favail < 16)


def within_hard_limit(which, wanted):
    """`wanted` as a resource limit, lowered to the hard limit this process runs under."""
    hard = resource.getrlimit(which)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)


###############################################################################
# Disk storage ################################################################
###############################################################################





FILE_LOCKS = KeyedLocks()        # Held while an original is replaced or deleted, or a thumbnail of it put in place.


class DiskStorage(Layout):
    """Attachments in folders under BASE_DIR, in the upstream layout."""

    def __init__(self, config):
        super().__init__(config)
        self.base = config.BASE_DIR

    def path(self, parts):
        return os.path.join(self.base, *parts)

    def original_path(self, coll, name):
        return self.path(self.original_parts(coll, name))

    def exists(self, coll, name):
        return os.path.isfile(self.original_path(coll, name))

    def save(self, coll, name, staged):
        """Move a complete staged file into place durably, then drop the old bytes' thumbnails."""
        target = self.original_path(coll, name)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        with FILE_LOCKS(target):
            try:
                os.replace(staged, target)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                self._copy_into(staged, target)
            fsync_folder(folder)
            self._delete_thumbnails(coll, name)

    def _copy_into(self, source, target):
        """Copy across file systems: to a temporary beside the target, then rename; a failed copy leaves no temporary."""
        temp, out = make_temp_file(os.path.dirname(target))
        try:
            with out, open(source, 'rb') as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            remove_quietly(temp)
            raise
        os.remove(source)

    def delete(self, coll, name):
        """Remove an original and exactly its own thumbnails; False when it is not there."""
        target = self.original_path(coll, name)
        with FILE_LOCKS(target):
            try:
                os.remove(target)
            except FileNotFoundError:
                return False
            self._delete_thumbnails(coll, name)
        return True

    def _delete_thumbnails(self, coll, name):
        folder = self.path([*self.folder_parts(coll), self.thumb_dir])
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            return
        owned = self.owns_thumbnail(coll, name)
        for entry in entries:
            if owned(entry):
                remove_quietly(os.path.join(folder, entry))

    def open(self, coll, name):
        """The original opened for reading (FileNotFoundError when there is none)."""
        return open(self.original_path(coll, name), 'rb')

    @contextlib.contextmanager
    def local_original(self, coll, name):
        """The original's path on this machine (FileNotFoundError when there is none)."""
        path = self.original_path(coll, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        yield path

    def send(self, coll, name, headers=None):
        path = self.original_path(coll, name)
        if not os.path.isfile(path):
            refuse(404, 'No such file.')
        return send_file(path, content_type(path, name), headers)

    def send_thumbnail(self, coll, name, scale, headers=None, webp=False, seen=None):
        """A cached thumbnail; `seen`: its stat just taken (by thumbnail_is_fresh), not taken again."""
        return send_file(self.path(self.thumbnail_parts(coll, name, scale, webp)), None, headers, seen)


    def send_static(self, parts):
        """An original with the type of its name, a thumbnail (PNG for a PDF, TIFF or HEIC) with its bytes'."""
        path = self.path(parts)
        if not self.is_static_parts(parts) or not os.path.isfile(path):
            refuse(404, 'No such file.')
        return send_file(path, None if parts[-2] == self.thumb_dir else content_type(path, parts[-1]))

    def thumbnail_is_fresh(self, coll, name, scale, webp=False):
        return self.derivative_is_fresh(coll, name, thumbnail_name(name, scale, webp))

    def derivative_is_fresh(self, coll, name, cache_name, identity=None):
        """A cached derivative counts when it is not older than its original (whose `identity` may be known):
        its stat then (true), else False."""
        try:
            derivative = os.stat(self.path(self.derivative_parts(coll, cache_name)))
            original = identity[1][1] if identity else os.stat(self.original_path(coll, name)).st_mtime_ns
            return derivative if derivative.st_mtime_ns >= original else False
        except FileNotFoundError:
            return False

    def original_identity(self, coll, name):
        """What names the original's current bytes (FileNotFoundError when there is none): failures and sizes
        are remembered under it."""
        return tuple(self.original_parts(coll, name)), file_identity(self.original_path(coll, name))

    def store_derivative(self, coll, name, cache_name, made, identity):
        """Rename a made derivative into place, unless the original is no longer `identity` (then False)."""
        original = self.original_path(coll, name)
        with FILE_LOCKS(original):
            try:
                if (tuple(self.original_parts(coll, name)), file_identity(original)) != identity:
                    return False
            except FileNotFoundError:
                return False
            target = self.path(self.derivative_parts(coll, cache_name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(made, target)
        return True

    def send_derivative(self, coll, cache_name, headers=None, mimetype=None, seen=None):
        """A cached derivative; `seen`: its stat just taken (by derivative_is_fresh), not taken again."""
        return send_file(self.path(self.derivative_parts(coll, cache_name)), mimetype, headers, seen)

    @contextlib.contextmanager
    def local_derivative(self, coll, cache_name):
        """The derivative's path on this machine (FileNotFoundError when there is none)."""
        path = self.path(self.derivative_parts(coll, cache_name))
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        yield path

    def make_thumbnail(self, coll, name, scale, thumbnailer, webp=False):
        """Convert (from the smallest fresh cached larger thumbnail if there is one, else the original) and
        rename into place; False if the original changed meanwhile."""
        original = self.original_path(coll, name)
        target = self.path(self.thumbnail_parts(coll, name, scale, webp))
        convert = functools.partial(self._convert_into_place, thumbnailer, scale=scale, webp=webp, target=target,
                                    original=original)
        try:
            identity = file_identity(original)
            remembered = (tuple(self.original_parts(coll, name)), identity)
            larger = self.larger_fresh_thumbnail(coll, name, scale)
            try:
                return convert(larger or original, identity=identity, remembered=None if larger else remembered)
            except (ThumbnailError, FileNotFoundError):        # the cached source may have just gone
                if not larger:
                    raise
                return convert(original, identity=identity, remembered=remembered)
        except FileNotFoundError:
            raise ThumbnailError('No such file.') from None

    def larger_fresh_thumbnail(self, coll, name, scale):
        """The path of the smallest cached thumbnail of a configured larger scale that is still fresh, or None."""
        for larger in self.larger_scales(scale):
            if self.thumbnail_is_fresh(coll, name, larger):
                return self.path(self.thumbnail_parts(coll, name, larger))
        return None

    @staticmethod
    def _convert_into_place(thumbnailer, source, *, scale, webp, target, original, identity, remembered):
        """One conversion of `source`, renamed to `target` only if the original is still `identity`. A failure
        is remembered only for the original itself (`remembered`): a cached source may just have gone."""
        with thumbnailer.converted(source, scale, os.path.dirname(target), remembered, webp) as made:
            with FILE_LOCKS(original):
                if file_identity(original) != identity:
                    return False
                os.replace(made, target)
        return True

    def health(self):
        return 'ok' if os.path.isdir(self.base) and os.access(self.base, os.W_OK | os.X_OK) else 'not writable'

    def sweep_temporaries(self, older_than=3600):
        """Remove temporaries left by a crash (not touched for an hour) in every folder of ours."""
        folders = [self.base] + [os.path.join(self.base, f) for f in (self.collections or {}).values()]
        cutoff = time.time() - older_than
        for folder in folders:
            for sub in (folder, os.path.join(folder, self.orig_dir), os.path.join(folder, self.thumb_dir)):
                sweep_folder(sub, cutoff)

    # --- Listing: what derivatives.py walks and the cache bound weighs -----------------------

    def originals(self, coll):
        """The names of the collection's originals (coll: a COLLECTION_DIRS key, or None without them)."""
        return (name for name, _modified in self.originals_modified(coll))

    def originals_modified(self, coll):
        """(name, modification time in epoch seconds) of each original, the time thumbnails are judged fresh by."""
        for entry, info in self._listed(coll, self.orig_dir, follow=True):
            yield entry.name, info.st_mtime

    def originals_bytes(self, coll):
        """The bytes the collection's originals hold."""
        return sum(info.st_size for _entry, info in self._listed(coll, self.orig_dir, follow=True))

    def thumbnails(self, coll):
        """(cache name, size in bytes, modification time in epoch seconds) of each cached thumbnail: only
        names that are thumbnail cache names, never a temporary, a link or anything else in the folder."""
        for entry, info in self._listed(coll, self.thumb_dir, follow=False):
            if derivative_source(entry.name) is not None:
                yield entry.name, info.st_size, info.st_mtime

    def remove_thumbnail(self, coll, cache_name):
        """Remove one cached thumbnail; ValueError for a name that is not a thumbnail cache name."""
        if name_problem(cache_name) or derivative_source(cache_name) is None:
            raise ValueError(f'not a thumbnail cache name: {cache_name!r}')
        remove_quietly(self.path([*self.folder_parts(coll), self.thumb_dir, cache_name]))

    def stored_size(self, parts):
        return os.path.getsize(self.path(parts))

    def _listed(self, coll, folder, follow):
        """(entry, stat) of the regular files (through a link when `follow`) of one of the collection's
        folders, read once; a file gone meanwhile is left out."""
        try:
            entries = os.scandir(self.path([*self.folder_parts(coll), folder]))
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                try:
                    if not name_problem(entry.name) and entry.is_file(follow_symlinks=follow):
                        yield entry, entry.stat(follow_symlinks=follow)
                except FileNotFoundError:
                    continue


def make_storage(config):
    """The storage STORAGE names."""
    if config.STORAGE == 's3':
        import s3storage
        return s3storage.S3Storage(config)
    return DiskStorage(config)


###############################################################################
# Uploads #####################################################################
###############################################################################

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ClientGone(Exception):
    """The client stopped sending before the upload was complete."""


class Upload:
    """A multipart upload as received: its text fields and its one file part, staged on disk."""

    def __init__(self):
        self.fields = {}
        self.staged = None

    def discard(self):
        """Remove the staged file unless it was moved into place."""
        if self.staged:
            remove_quietly(self.staged)
            self.staged = None


def decoded(data, charset):
    """A text part's bytes read by the charset it declares (Specify 6 sends ISO-8859-1); 400 for one unknown,
    not a text encoding (hex), or one that fails even with 'replace' (idna)."""
    try:
        return data.decode(charset, 'replace')
    except (LookupError, ValueError):
        refuse(400, 'A text part of the upload declares a charset this server cannot read.')


def receive_upload(environ, staging_folder, max_size):
    """Parse a multipart body as it streams in; the file part goes to a temporary file."""
    ctype, options = multipart.parse_options_header(environ.get('CONTENT_TYPE', ''))
    if ctype != 'multipart/form-data' or not options.get('boundary'):
        refuse(400, 'An upload must be multipart/form-data.')
    length = environ.get('CONTENT_LENGTH') or ''
    if not re.fullmatch(r'[0-9]+', length):
        refuse(411, 'An upload needs a Content-Length.')
    if int(length) > max_size:
        refuse(413, f'The upload is larger than this server accepts ({max_size} bytes).')
    stream = environ['wsgi.input']

    def read(size):
        try:
            return stream.read(size)
        except TimeoutError:
            refuse(408, 'The upload arrived too slowly.')
        except OSError as error:
            raise ClientGone() from error

    upload, sink, field = Upload(), None, None
    parser = multipart.PushMultipartParser(options['boundary'], int(length), max_header_count=16,
                                           max_segment_count=100)
    try:
        try:                 # closing flushes what is buffered, which a full disk refuses
            with parser:
                for event in parser.parse_blocking(read, CHUNK):
                    if isinstance(event, multipart.MultipartSegment):
                        if event.filename is not None:
                            if upload.staged:
                                refuse(400, 'An upload carries one file only.')
                            upload.staged, sink = make_temp_file(staging_folder)
                        else:
                            field, charset, sink = event.name, event.charset or 'utf-8', bytearray()
                    elif event and isinstance(sink, bytearray):
                        if len(sink) + len(event) > MAX_FIELD_SIZE:
                            refuse(400, f'The field {field!r} is too long.')
                        sink.extend(event)
                    elif event:
                        sink.write(event)
                    elif isinstance(sink, bytearray):
                        upload.fields.setdefault(field, decoded(sink, charset))
                    else:
                        sink.flush()
                        os.fsync(sink.fileno())
                        sink.close()
        finally:
            if sink is not None and not isinstance(sink, bytearray):
                sink.close()
        return upload
    except (multipart.MultipartError, ClientGone):
        upload.discard()
        refuse(400, 'The upload is malformed or incomplete.')
    except OSError as error:
        upload.discard()
        if error.errno in NO_SPACE:
            refuse(507, 'The server has no room to store this file.')
        raise
    except BaseException:
        upload.discard()
        raise


###############################################################################
# Metadata ####################################################################
###############################################################################

class MetadataLimitExceeded(Exception):
    """A file's metadata could not be read within the limits (time, memory, bytes read, answer size)."""


JOB, READ, LENGTH = struct.Struct('>Q'), struct.Struct('>QI'), struct.Struct('>I')   # the pipe's framing
READY, READ_REQUEST, DONE, TOO_LARGE = b'+', b'R', b'D', b'T'     # what the child says
CHILD_START_TIMEOUT = 30         # seconds a new child may take to start (a busy machine is not the file's fault)
HEAD = 64 * 1024                 # the first bytes of a file, read before a child is asked (its first read)


class MetadataReader:
    """Reads EXIF in child processes, at most METADATA_WORKERS at once, each bounded in time and memory.

    exifread runs in a child so that a parser bug (an endless loop, a blow-up) costs one child, never a
    server thread; the child reads the file only through its pipe from here, so it never touches the
    storage and reads at most METADATA_MAX_READ bytes. Children stay for the next file unless they failed.
    Files found beyond the limits are remembered by their first bytes and size, so asking again is cheap.
    """
    remember_for, remembered = 600, 1024     # seconds and number of files found beyond the limits

    def __init__(self, config):
        self.timeout, self.wait, self.max_read = config.METADATA_TIMEOUT, config.METADATA_WAIT, config.METADATA_MAX_READ
        self.limits = [str(config.METADATA_MEMORY_LIMIT), str(config.METADATA_TIMEOUT),
                       str(config.METADATA_MAX_VALUE), str(config.METADATA_MAX_ANSWER)]
        self.slots = threading.BoundedSemaphore(config.METADATA_WORKERS)
        self.admitted = threading.BoundedSemaphore(config.METADATA_WORKERS + config.THREADS // 4)  # running, waiting
        self.guard = threading.Lock()
        self.idle, self.running, self.beyond = [], {}, collections.OrderedDict()

    def groups(self, readable):
        """Specify 6's groups of an open file's EXIF; 503 with Retry-After when every slot stays busy."""
        size = readable.seek(0, io.SEEK_END)
        readable.seek(0)
        head = readable.read(HEAD)
        key = (size, hashlib.sha256(head).digest())
        self._refuse_if_known(key)
        if not self.admitted.acquire(blocking=False):
            self._busy()
        try:
            with self.guard:
                other = self.running.get(key)
                mine = None if other else self.running.setdefault(key, threading.Event())
            if other is not None:                # the same bytes are being read: wait for that verdict
                other.wait(self.wait + self.timeout)
                self._refuse_if_known(key)
            try:
                return self._in_slot(readable, size, head, key)
            finally:
                if mine is not None:
                    with self.guard:
                        del self.running[key]
                    mine.set()
        finally:
            self.admitted.release()

    def _in_slot(self, readable, size, head, key):
        if not self.slots.acquire(timeout=self.wait):
            self._busy()
        try:
            return self._extract(readable, size, head)
        except MetadataLimitExceeded:
            with self.guard:
                self.beyond[key] = time.monotonic() + self.remember_for
                while len(self.beyond) > self.remembered:
                    self.beyond.popitem(last=False)
            raise
        finally:
            self.slots.release()

    def _refuse_if_known(self, key):
        with self.guard:
            if self.beyond.get(key, 0) > time.monotonic():
                raise MetadataLimitExceeded('these bytes were beyond the limits a short while ago')

    def _busy(self):
        raise bottle.HTTPError(503, 'The server is busy reading metadata; try again shortly.',
                               **{'Retry-After': str(self.timeout)})

    def _extract(self, readable, size, head):
        """Run one file through a child; the child is kept for the next file unless it failed."""
        child = self._child()
        try:
            text, overrun = self._converse(child, readable, size, head, time.monotonic() + self.timeout)
        except BaseException:
            child.kill()
            child.wait()
            raise
        with self.guard:
            self.idle.append(child)
        if overrun:
            raise MetadataLimitExceeded('it read more than METADATA_MAX_READ')
        try:
            return json.loads(text)
        except ValueError:
            raise MetadataLimitExceeded('the reader answered something else than JSON') from None

    def _child(self):
        """An idle child still alive, or a new one once it is ready (its start is not the file's time)."""
        with self.guard:
            while self.idle:
                child = self.idle.pop()
                if child.poll() is None:
                    return child
        try:
            child = subprocess.Popen([sys.executable, '-c', 'import server; server.metadata_child()', *self.limits],
                                     cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as error:
            log.warning('could not start a metadata reader: %s', error)
            self._busy()
        os.set_blocking(child.stdin.fileno(), False)
        os.set_blocking(child.stdout.fileno(), False)
        try:
            if receive(child.stdout.fileno(), 1, time.monotonic() + CHILD_START_TIMEOUT) == READY:
                return child
        except MetadataLimitExceeded:
            pass
        log.warning('a metadata reader did not start within %s s', CHILD_START_TIMEOUT)
        child.kill()
        child.wait()
        self._busy()

    def _converse(self, child, readable, size, head, deadline):
        """Serve the child's reads until it answers: (its JSON, whether it wanted more than METADATA_MAX_READ).

        Time spent reading the storage moves the deadline: a slow store is not the file's fault.
        """
        send(child.stdin.fileno(), JOB.pack(size), deadline)
        served, overrun = 0, False
        while True:
            kind = receive(child.stdout.fileno(), 1, deadline)
            if kind == TOO_LARGE:
                raise MetadataLimitExceeded('more than METADATA_MEMORY_LIMIT or METADATA_MAX_ANSWER')
            if kind == DONE:
                length = LENGTH.unpack(receive(child.stdout.fileno(), LENGTH.size, deadline))[0]
                return receive(child.stdout.fileno(), length, deadline), overrun
            if kind != READ_REQUEST:
                raise MetadataLimitExceeded('the reader broke off')
            offset, length = READ.unpack(receive(child.stdout.fileno(), READ.size, deadline))
            length = min(length, CHUNK)
            overrun = overrun or served + length > self.max_read
            if overrun:
                data = b''
            elif offset + length <= len(head) or len(head) == size:
                data = head[offset:offset + length]
            else:
                started = time.monotonic()
                readable.seek(offset)
                data = readable.read(length)
                deadline += time.monotonic() - started
            served += len(data)
            send(child.stdin.fileno(), LENGTH.pack(len(data)) + data, deadline)


def receive(descriptor, count, deadline):
    """Exactly `count` bytes from a non-blocking pipe before the deadline."""
    data = bytearray()
    while len(data) < count:
        wait_for_pipe(descriptor, deadline, reading=True)
        try:
            chunk = os.read(descriptor, count - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            raise MetadataLimitExceeded('the reader ended without an answer')
        data += chunk
    return bytes(data)


def send(descriptor, data, deadline):
    """All of `data` into a non-blocking pipe before the deadline."""
    view = memoryview(data)
    while view:
        wait_for_pipe(descriptor, deadline, reading=False)
        try:
            view = view[os.write(descriptor, view):]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            raise MetadataLimitExceeded('the reader ended without an answer') from None


def wait_for_pipe(descriptor, deadline, reading):
    left = deadline - time.monotonic()
    ready = select.select([descriptor] if reading else [], [] if reading else [descriptor], [], max(left, 0))
    if not any(ready):
        raise MetadataLimitExceeded('it took longer than METADATA_TIMEOUT')


# --- The child's side ------------------------------------------------------------

def metadata_child():
    """A child's loop: one file per job, read through the pipe, until the server closes the pipe."""
    memory, timeout, max_value, max_answer = map(int, sys.argv[1:5])
    lower_limit(resource.RLIMIT_AS, memory)
    os.nice(10)                         # the server's own threads come first when CPUs are short
    channel = os.dup(1)
    os.dup2(2, 1)                       # nothing printed in here can reach the server as an answer
    exhausted = watch_exif_log()
    write_all(channel, READY)
    while True:
        job = read_exactly(0, JOB.size, at_start=True)
        if not job:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)     # a backstop should the server be gone:
        lower_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + timeout + 2)   # SIGXCPU ends it
        source = io.BufferedReader(ServedFile(JOB.unpack(job)[0], channel), 64 * 1024)
        exhausted.seen = False
        answer = child_answer(source, max_value, max_answer)
        write_all(channel, TOO_LARGE if exhausted.seen else answer)


def lower_limit(kind, soft):
    """Set a soft resource limit, never above the hard one the deployment may have set."""
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def watch_exif_log():
    """A handler on exifread's log that notes when it ran out of memory; its warnings go nowhere else."""
    exhausted = MemoryExhausted()
    exif_log = logging.getLogger('exifread')
    exif_log.setLevel(logging.WARNING)
    exif_log.propagate = False
    exif_log.addHandler(exhausted)
    return exhausted


class MemoryExhausted(logging.Handler):
    """Notes exifread's own report of a MemoryError it caught (it then shows that tag as empty)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record):
        self.seen = self.seen or str(record.msg).startswith('MemoryError')


def child_answer(source, max_value, max_answer):
    """DONE + the groups as JSON (values cut to max_value), or TOO_LARGE."""
    try:
        try:
            tags = exifread.process_file(source, details=False, extract_thumbnail=False)
        except MemoryError:
            raise
        except Exception:               # exifread raises many kinds of errors on odd files: no EXIF
            tags = {}
        text = json.dumps(exif_groups(tags, max_value)).encode()
    except MemoryError:
        return TOO_LARGE
    if len(text) > max_answer:
        return TOO_LARGE
    return DONE + LENGTH.pack(len(text)) + text


def exif_groups(tags, max_value):
    """Specify 6's shape: [{"Name": group, "Fields": {tag: text}}], one entry per EXIF group."""
    groups = {}
    for key, value in tags.items():
        if hasattr(value, 'printable') and ' ' in key:
            group, tag = key.split(' ', 1)
            text = str(value.printable)
            groups.setdefault(group, {})[tag] = text if len(text) <= max_value else text[:max_value - 1] + '\u2026'
    return [{'Name': group, 'Fields': fields} for group, fields in groups.items()]


class ServedFile(SeekableReader):
    """The file as the server serves it over the pipe: read-only and seekable."""

    def __init__(self, size, channel):
        super().__init__(size)
        self.channel = channel

    def fetch(self, position, size):
        write_all(self.channel, READ_REQUEST + READ.pack(position, size))
        length = LENGTH.unpack(read_exactly(0, LENGTH.size))[0]
        return read_exactly(0, length)


def read_exactly(descriptor, count, at_start=False):
    """`count` bytes from the server's pipe; b'' when it closed at the start of a job, else the child ends."""
    data = bytearray()
    while len(data) < count:
        chunk = os.read(descriptor, count - len(data))
        if not chunk:
            if at_start and not data:
                return b''
            os._exit(0)                 # the server is gone or gave up on this job
        data += chunk
    return bytes(data)


def write_all(descriptor, data):
    """All of `data` to the server's pipe; the child ends quietly when the server is gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(descriptor, view):]
    except BrokenPipeError:
        os._exit(0)


###############################################################################
# The web application #########################################################
###############################################################################


HOST_PORT = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?')
DEFAULT_PORTS = {'http': '80', 'https': '443'}


def unroutable(environ):
    """Why a request cannot reach Bottle (a Content-Length that is not a number; a path, as WSGI's latin-1
    bytes, that is not UTF-8, whose bad bytes Bottle would drop), or None."""
    if not re.fullmatch(r'[0-9]*', environ.get('CONTENT_LENGTH') or ''):
        return b'Bad Content-Length.'
    try:
        environ.get('PATH_INFO', '').encode('latin-1').decode('utf-8')
    except UnicodeError:
        return b'The path is not UTF-8.'
    return None


def unescape_query(query):
    """Read `&amp;` between parameters as `&` (some Specify pages escape their URLs)."""
    return '&'.join(re.sub(r'^(amp;)+', '', part) for part in query.split('&'))


def current_upload():
    """The request's multipart upload, received once and kept for the request."""
    environ = bottle.request.environ
    if 'wast.upload' not in environ:
        app = bottle.request.app
        environ['wast.upload'] = receive_upload(environ, app.storage.staging_folder(),
                                                app.settings.MAX_UPLOAD_SIZE)
    return environ['wast.upload']


def discard_upload():
    """After a request: remove what an upload staged, unless it was moved into place."""
    if 'wast.upload' in bottle.request.environ:
        bottle.request.environ['wast.upload'].discard()


def param(name):
    """A request parameter as text (None when missing or not UTF-8); read once per request."""
    environ = bottle.request.environ
    if 'wast.params' not in environ:
        environ['wast.params'] = request_params()
    return environ['wast.params'].get(name)


def request_params():
    """The parameters of a request: the upload's fields, or a form body's, over the query string's."""
    request = bottle.request
    if request.route.config.get('upload'):
        source, fields = request.query, current_upload().fields
    elif request.content_type.startswith('application/x-www-form-urlencoded'):
        source, fields = request.params, {}
    else:
        source, fields = request.query, {}
    return {**{name: source.getunicode(name) for name in source}, **fields}


READ_TOKENS_REMEMBERED = 100_000     # tokens read with that are remembered, so that they cannot write (ReadTokens)


def require_token(name, reading=True):
    """403 unless the request's token signs `name` (or auth is disabled); a write's token must not be one that
    was read with."""
    app = bottle.request.app
    token, started = param('token'), bottle.request.environ['wast.started']
    problem = token_problem(app.key, token, name, started, app.settings.TIME_TOLERANCE)
    if problem:
        refuse(403, problem)
    if app.key is None:
        return
    keep_private()
    if reading:
        app.read_tokens.note(token, started, app.settings.TIME_TOLERANCE)
    elif not name_problem(name) and app.read_tokens.read_with(token):     # a bad name: its own 400 first
        refuse(403, 'This token was used to read the file: a change needs a token of its own (make a new one).')


def keep_private():
    """The answer needed a token or a grant: no shared cache may keep it (see AssetServer.wsgi)."""
    bottle.request.environ['wast.private'] = True


def note_read_token(name):
    """A token sent to read though none is needed (REQUIRE_KEY_FOR_GET off) is remembered too, if it is valid:
    it may have been written into a URL all the same."""
    app = bottle.request.app
    token, started = param('token'), bottle.request.environ['wast.started']
    if token and app.key is not None and not token_problem(app.key, token, name, started,
                                                           app.settings.TIME_TOLERANCE):
        app.read_tokens.note(token, started, app.settings.TIME_TOLERANCE)


class TokenCheck:
    """Bottle plugin: a route with signed=<param> needs a token over that parameter.

    Routes also marked read=True are checked only when REQUIRE_KEY_FOR_GET is on; the others are writes (and
    testkey), which a token read with cannot pass.
    """
    name, api = 'token_check', 2

    def apply(self, callback, route):
        signed = route.config.get('signed')
        if not signed:
            return callback
        reading = bool(route.config.get('read'))

        def checked(*args, **kwargs):
            if not reading or route.app.settings.REQUIRE_KEY_FOR_GET:
                require_token(param(signed) or '', reading)
            else:
                note_read_token(param(signed) or '')
            return callback(*args, **kwargs)
        return checked


class AssetServer(bottle.Bottle):
    """The Bottle app, stamping every answer (errors too) with X-Timestamp and CORS."""
    clock = staticmethod(time.time)     # when a request started, for its token's age; a test may set an app's own

    def __init__(self, config, storage, thumbnailer, key):
        super().__init__()
        self.settings, self.storage, self.thumbnailer, self.key = config, storage, thumbnailer, key
        self.discovery = bottle.SimpleTemplate(name='web_asset_store.xml', lookup=[VIEWS_DIR])

    def wsgi(self, environ, start_response):
        started = environ['wast.started'] = self.clock()
        if 'amp;' in environ.get('QUERY_STRING', ''):
            environ['QUERY_STRING'] = unescape_query(environ['QUERY_STRING'])

        def start_stamped(status, headers, exc_info=None):
            headers.append(('X-Timestamp', str(int(time.time()))))
            headers.append(('Access-Control-Allow-Origin', '*'))
            if environ.get('wast.private'):
                headers[:] = private_caching(headers)
            if self.settings.ACCESS_LOG:
                log.info('%s %s %s %s %.0fms', printable(environ.get('wast.client') or environ.get('REMOTE_ADDR', '-')),
                         printable(environ.get('REQUEST_METHOD', '')[:LOGGED_PATH]),
                         printable(logged_path(environ.get('PATH_INFO', ''))),
                         status.split(' ', 1)[0], 1000 * (time.time() - started))
            return start_response(status, headers, exc_info)
        problem = unroutable(environ)
        if problem:
            start_stamped('400 Bad Request', [('Content-Type', 'text/plain; charset=UTF-8')])
            return [problem]
        return super().wsgi(environ, start_stamped)

    def default_error_handler(self, error):
        """Errors are short plain text (a path Bottle echoes cut to ECHOED_TEXT); a fault's traceback goes to the
        log only."""
        bottle.response.content_type = 'text/plain; charset=UTF-8'
        if error.status_code == 500:
            return 'Internal server error.'
        text = str(error.body)
        return text if len(text) <= ECHOED_TEXT else text[:ECHOED_TEXT] + '…'


LOGGED_PATH = 512                 # characters of a request's path (and method) written to the access log
ECHOED_TEXT = 300                 # characters of an error's text answered (Bottle's 404 names the path)
GRANT_IN_PATH = re.compile(r'(/iiif/grant/[0-9]{1,12})\.[0-9a-f]{32}')


def logged_path(path):
    """A path as the access log keeps it: a viewer grant reduced to its expiry (it is a credential), the whole
    cut to LOGGED_PATH characters."""
    path = GRANT_IN_PATH.sub(r'\1.…', path)
    return path if len(path) <= LOGGED_PATH else path[:LOGGED_PATH] + '…'


def private_caching(headers):
    """An answer's headers with its Cache-Control made private (a shared cache could serve it after the token
    that let it out expired), its max-age kept."""
    kept = [value for name, value in headers if name.lower() == 'cache-control']
    directives = [part.strip() for value in kept for part in value.split(',')
                  if part.strip() and part.strip().lower() not in ('public', 'private')]
    return [(name, value) for name, value in headers if name.lower() != 'cache-control'] + [
        ('Cache-Control', ', '.join(['private', *directives]))]


def public_base_url():
    """scheme://host[:port] as clients reach the server (proxy headers only when trusted)."""
    config = bottle.request.app.settings
    scheme, host, port = config.PUBLIC_SCHEME, config.SERVER_NAME, str(config.SERVER_PORT)
    if config.TRUST_PROXY_HEADERS:
        def forwarded(name):
            return bottle.request.headers.get('X-Forwarded-' + name, '').split(',')[0].strip()
        if forwarded('Proto').lower() in DEFAULT_PORTS:
            scheme = forwarded('Proto').lower()
            port = DEFAULT_PORTS[scheme]
        host_port = HOST_PORT.fullmatch(forwarded('Host'))
        if host_port:
            host, port = host_port.group(1), host_port.group(2) or DEFAULT_PORTS[scheme]
        if is_port(forwarded('Port')):
            port = forwarded('Port')
    if not is_port(port) or port == DEFAULT_PORTS[scheme]:
        return f'{scheme}://{host}'
    return f'{scheme}://{host}:{int(port)}'


def is_port(text):
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


CONTROL_CHARACTER = re.compile(r'[\x00-\x1f\x7f]')


def send_file(path, mimetype, headers=None, seen=None):
    """Serve a file on disk (mimetype None: told from its bytes), or hand it to the web server in front.

    X-Sendfile carries the path as it is (mod_xsendfile 0.12, Debian's, reads it raw), and no header
    may carry a control character, so a path with one is served here instead. A small file is answered
    from SMALL_FILES while its inode, time and size (`seen`: its stat just taken) are those it was read with."""
    config = bottle.request.app.settings
    if config.FILE_OFFLOAD and not (config.FILE_OFFLOAD == 'apache' and CONTROL_CHARACTER.search(path)):
        if not os.path.isfile(path):
            refuse(404, 'No such file.')
        if mimetype is None:
            with open(path, 'rb') as handle:
                mimetype = kind_of(handle.read(1024)) or 'application/octet-stream'
        handover = {'Content-Type': mimetype, 'X-Content-Type-Options': 'nosniff'}
        if may_run_scripts(mimetype):
            handover['Content-Security-Policy'] = 'sandbox'
        if config.FILE_OFFLOAD == 'nginx':
            relative = os.path.relpath(path, config.BASE_DIR).replace(os.sep, '/')
            handover['X-Accel-Redirect'] = config.OFFLOAD_PREFIX + quote(relative)
        else:
            handover['X-Sendfile'] = path
        return bottle.HTTPResponse('', 200, **(headers or {}), **handover)
    small = SMALL_FILES.get(path, seen)
    if small is None:
        try:
            handle = open(path, 'rb')
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            refuse(404, 'No such file.')
        info = os.fstat(handle.fileno())        # of the file opened, even if it is replaced meanwhile
        if info.st_size > SMALL_FILES.largest:
            return large_file_answer(handle, info, mimetype, headers)
        with handle:
            small = info, handle.read()
        SMALL_FILES.put(path, *small)
    info, data = small
    return file_answer(info.st_size, etag_of(info), info.st_mtime, mimetype or kind_of(data[:1024])
                       or 'application/octet-stream', headers, lambda start, end: data[start:end])


def large_file_answer(handle, info, mimetype, headers):
    """An open file too large to keep in SMALL_FILES, streamed from disk (the file closed when it ends)."""
    if mimetype is None:
        mimetype = kind_of(handle.read(1024)) or 'application/octet-stream'
    answer = file_answer(info.st_size, etag_of(info), info.st_mtime, mimetype,
                         headers, lambda start, end: file_body(handle, start, end))
    if not inspect.isgenerator(answer.body):
        handle.close()
    return answer


def etag_of(info):
    return f'"{info.st_size:x}-{info.st_mtime_ns:x}"'


class SmallFiles:
    """The bytes of recently served small files (thumbnails, tiles), at most `most` bytes, each at most `largest`:
    answered after one stat that finds the file as it was read (inode, time, size), the least recently used
    dropped first."""

    def __init__(self, most, largest):
        self.most, self.largest, self.held = most, largest, 0
        self.files, self.lock = collections.OrderedDict(), threading.Lock()

    def get(self, path, seen=None):
        """(stat, bytes) of the file at `path` if kept and unchanged (as `seen`, a stat just taken, or one taken now),
        else None."""
        with self.lock:
            kept = self.files.get(path)
        if kept is None:
            return None
        try:
            now = seen if isinstance(seen, os.stat_result) else os.stat(path)
        except OSError:
            return None
        info, _data = kept
        if (now.st_ino, now.st_mtime_ns, now.st_size) != (info.st_ino, info.st_mtime_ns, info.st_size):
            return None
        with self.lock:
            if path in self.files:
                self.files.move_to_end(path)
        return kept

    def put(self, path, info, data):
        with self.lock:
            old = self.files.pop(path, None)
            self.held -= len(old[1]) if old else 0
            self.files[path] = (info, data)
            self.held += len(data)
            while self.held > self.most:
                _path, (_info, dropped) = self.files.popitem(last=False)
                self.held -= len(dropped)


SMALL_FILES = SmallFiles(most=32 * 1024 ** 2, largest=256 * 1024)    # 32 MiB of answers of up to 256 KiB


def file_body(handle, start, end):
    """Bytes start..end of an open file: read at once when small, else streamed (closing the file)."""
    handle.seek(start)
    if end - start <= CHUNK:
        return handle.read(end - start)
    return stream_file(handle, end - start)


def stream_file(handle, length):
    with handle:
        while length > 0:
            chunk = handle.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def valid_type(text):
    if text not in ('O', 'T'):
        refuse(400, 'Bad type: it must be O (original) or T (thumbnail).')
    return text


def require_original(coll, name):
    """404 unless the original is stored."""
    if not bottle.request.app.storage.exists(coll, name):
        refuse(404, 'No such file.')


def ensure_thumbnail(coll, name, scale, webp=False, answerable=False):
    """Make the thumbnail a request asks for: 404 when it cannot be made, 507 when the disk has no room
    (no space or no inode) for it or its scratch folder. `answerable`: a browser's WebP may be answered by
    the plain thumbnail until it is made (Layout.ensure_answerable_thumbnail)."""
    app = bottle.request.app
    ensure = app.storage.ensure_answerable_thumbnail if answerable else app.storage.ensure_thumbnail
    try:
        return ensure(coll, name, scale, app.thumbnailer, webp)
    except ThumbnailError as error:
        refuse(404, str(error))
    except OSError as error:
        if error.errno in NO_SPACE:
            refuse(507, 'The server has no room to make this thumbnail.')
        raise


def answer_storage_faults(callback):
    """Bottle plugin: a storage that cannot be reached, or conversions too busy to take more, answer 503."""
    @functools.wraps(callback)
    def guarded(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except StorageUnavailable as error:
            raise bottle.HTTPError(503, f'The storage is unavailable: {error}',
                                   **{'Retry-After': str(RETRY_AFTER)}) from None
        except ThumbnailsBusy:
            raise bottle.HTTPError(503, 'Too many thumbnails are being made: try again shortly.',
                                   **{'Retry-After': str(RETRY_AFTER)}) from None
    return guarded


# --- Routes -------------------------------------------------------------------

def index():
    return 'Web Asset Server for Specify: running.'


def discovery():
    bottle.response.content_type = 'text/xml; charset=UTF-8'
    return bottle.request.app.discovery.render(base=public_base_url())


def capabilities():
    """What this server offers, for clients to discover (Specify 7 hands every discovery URL to the browser):
    public like web_asset_store.xml, readable from any origin, naming no collection."""
    app = bottle.request.app
    config, base = app.settings, public_base_url()
    thumbnailed = sorted(app.thumbnailer.usable_kinds())
    bottle.response.content_type = 'application/json'
    bottle.response.set_header('Cache-Control', 'public, max-age=300')
    return json.dumps({
        'server': 'Web Asset Server for Specify',
        'version': VERSION,
        'maxUploadBytes': config.MAX_UPLOAD_SIZE,
        'tokenRequiredForGet': bool(config.REQUIRE_KEY_FOR_GET),
        'thumbnails': {'types': thumbnailed, 'maxScale': config.MAX_THUMBNAIL_SCALE,
                       'pregeneratedScales': config.PREGENERATE_SCALES, 'webp': bool(config.WEBP_THUMBNAILS)},
        'iiif': {'versions': ['2.1', '3.0'], 'services': {'2.1': base + '/iiif/2', '3.0': base + '/iiif/3'},
                 'types': [kind for kind in thumbnailed if kind in IIIF_KINDS], 'maxSize': config.IIIF_MAX_SIZE},
    }, indent=1)


def preflight(**_path):
    """CORS preflight of a browser's cross-origin upload."""
    wanted = bottle.request.headers.get('Access-Control-Request-Headers', '')
    bottle.response.set_header('Access-Control-Allow-Methods', 'GET, HEAD, POST, OPTIONS')
    bottle.response.set_header('Access-Control-Allow-Headers', re.sub(r'[^A-Za-z0-9, -]', '', wanted) or '*')
    bottle.response.set_header('Access-Control-Max-Age', '86400')
    return ''


def fileupload():
    app = bottle.request.app
    upload = current_upload()
    kind = param('type')
    if kind == 'T':
        return 'Ignoring thumbnail upload!'
    valid_type(kind)
    name = valid_name(param('store'), 'store')
    if not upload.staged:
        refuse(400, 'The upload has no file part.')
    coll = param('coll')
    scales = app.settings.PREGENERATE_SCALES
    pregenerate = bool(scales) and sniff_kind(upload.staged) in app.thumbnailer.kinds
    try:
        app.storage.save(coll, name, upload.staged)
    except OSError as error:
        if error.errno in NO_SPACE:
            refuse(507, 'The server has no room to store this file.')
        raise
    upload.staged = None
    app.thumbnailer.failures.forget(tuple(app.storage.original_parts(coll, name)))
    if pregenerate:
        app.thumbnailer.in_background(functools.partial(pregenerate_thumbnails, app.storage, coll, name, scales))
    return 'Ok.'


def pregenerate_thumbnails(storage, coll, name, scales, thumbnailer):
    """Make each pregenerated scale, largest first, so that each smaller one is made from the one before."""
    for scale in scales:
        storage.ensure_thumbnail(coll, name, scale, thumbnailer)


def fileget():
    app = bottle.request.app
    name = valid_name(param('filename'), 'filename')
    kind = valid_type(param('type'))
    scale = valid_scale(param('scale'), app.settings.MAX_THUMBNAIL_SCALE) if kind == 'T' else None
    coll = param('coll')
    downloadname = param('downloadname')
    headers = {'Content-Disposition': "inline; filename*=utf-8''" + quote(downloadname, safe='')} \
        if downloadname else None
    if kind == 'O':
        return app.storage.send(coll, name, headers)
    webp = app.settings.WEBP_THUMBNAILS and accepts_webp(bottle.request.headers.get('Accept', ''))
    seen, webp = ensure_thumbnail(coll, name, scale, webp, answerable=True)     # 404 without an original
    if app.settings.WEBP_THUMBNAILS:
        headers = dict(headers or {}, Vary='Accept')
    return app.storage.send_thumbnail(coll, name, scale, headers, webp, seen)


def accepts_webp(accept):
    """Whether an Accept header names image/webp with a quality above 0 (`*/*` does not count: Java's default has it)."""
    for item in accept.split(','):
        media_type, *parameters = [part.strip().lower() for part in item.split(';')]
        if media_type == 'image/webp':
            quality = [p[2:].strip() for p in parameters if p.startswith('q=')]
            return not quality or not re.fullmatch(r'0(\.0{0,3})?', quality[0])
    return False


def filedelete():
    app = bottle.request.app
    name = valid_name(param('filename'), 'filename')
    if not app.storage.delete(param('coll'), name):
        refuse(404, 'No such file.')
    app.thumbnailer.failures.forget(tuple(app.storage.original_parts(param('coll'), name)))
    return 'Ok.'


def getmetadata():
    app = bottle.request.app
    name = valid_name(param('filename'), 'filename')
    try:
        with app.storage.open(param('coll'), name) as original:
            groups = app.metadata.groups(original)
    except FileNotFoundError:
        refuse(404, 'No such file.')
    except MetadataLimitExceeded as error:
        log.warning('metadata of %s not read: %s', printable(name), error)
        refuse(422, "This file's metadata is too large or too complex to read.")
    if param('dt') == 'date':
        date = {group['Name']: group['Fields'] for group in groups}.get('EXIF', {}).get('DateTimeOriginal')
        if date is None:
            refuse(404, 'The file has no EXIF DateTimeOriginal.')
        return date
    bottle.response.content_type = 'application/json'
    return json.dumps(groups)


def testkey():
    return 'Ok.'


def health():
    """For load balancers and Docker: can storage and thumbnails be used? Needs no key, tells nothing private."""
    app = bottle.request.app
    checks = {'storage': app.storage.health(), 'thumbnails': app.thumbnailer.health()}
    bottle.response.status = 200 if all(value in ('ok', 'off') for value in checks.values()) else 503
    bottle.response.content_type = 'application/json'
    return json.dumps(checks)


def getfileref():
    app = bottle.request.app
    name = valid_name(param('filename'), 'filename')
    thumbnail = valid_type(param('type') or 'O') == 'T'
    scale = valid_scale(param('scale'), app.settings.MAX_THUMBNAIL_SCALE) if thumbnail else None
    coll = param('coll')
    require_original(coll, name)
    parts = app.storage.original_parts(coll, name)
    if thumbnail:
        ensure_thumbnail(coll, name, scale)
        parts = app.storage.thumbnail_parts(coll, name, scale)
    url = public_base_url() + '/static/' + '/'.join(quote(p, safe='') for p in parts)
    if app.settings.REQUIRE_KEY_FOR_GET:
        url += '?token=' + quote(param('token') or '', safe='')
    return url


def static(path):
    """A stored file by its path; with REQUIRE_KEY_FOR_GET the token signs the original's name,
    also for one of its thumbnails (as getfileref hands the token on)."""
    app = bottle.request.app
    parts = path.split('/')
    signed = parts[-1]
    if len(parts) > 1 and parts[-2] == app.settings.THUMB_DIR:
        signed = thumbnail_source(signed)
    if app.settings.REQUIRE_KEY_FOR_GET:
        if signed is None:
            refuse(404, 'No such file.')
        require_token(signed)
    elif signed is not None:
        note_read_token(signed)
    return app.storage.send_static(parts)


# --- IIIF Image API (deep zoom) ------------------------------------------------

def iiif_original(identifier, grant=None):
    """(collection, name) of the original an IIIF identifier names: 404 for none; 403 without the token or
    the viewer grant REQUIRE_KEY_FOR_GET needs (a grant given is checked even without it)."""
    app = bottle.request.app
    sent = bottle.request.environ.get('REQUEST_URI', '').partition('?')[0].lower()
    if '%2f' in sent:                     # decoded into a separator before routing: no name holds a slash
        refuse(404, 'No such image.')
    try:
        coll, name = iiif.spelled_name(identifier, app.settings.COLLECTION_DIRS)
    except iiif.IIIFError as error:
        refuse(error.status, error.reason)
    if grant is not None:
        problem = grant_problem(app.key, grant, coll, name, bottle.request.environ['wast.started'],
                                app.settings.IIIF_GRANT_SECONDS)
        if problem:
            refuse(403, problem)
        keep_private()
    elif app.settings.REQUIRE_KEY_FOR_GET:
        require_token(name)
    else:
        note_read_token(name)
    if app.settings.COLLECTION_DIRS and coll not in app.settings.COLLECTION_DIRS:
        refuse(404, 'No such image.')       # only now: without the token, a known and an unknown one answer alike
    return coll, name


def viewer_grant(coll, name, grant):
    """The grant a service's URLs carry: the one given, a new one for a request that a token let in, or None."""
    app = bottle.request.app
    if grant is None and app.settings.REQUIRE_KEY_FOR_GET and app.key is not None:
        return new_grant(app.key, coll, name, bottle.request.environ['wast.started'], app.settings.IIIF_GRANT_SECONDS)
    return grant


class ViewSizes:
    """The size as shown of recently viewed originals, by their identity (at most `entries`, the oldest forgotten
    first): a cached tile is answered without reading the original or its pyramid."""

    def __init__(self, entries):
        self.entries, self.sizes, self.lock = entries, collections.OrderedDict(), threading.Lock()

    def get(self, identity):
        with self.lock:
            size = self.sizes.get(identity)
            if size:
                self.sizes.move_to_end(identity)
            return size

    def remember(self, identity, size):
        with self.lock:
            self.sizes[identity] = size
            while len(self.sizes) > self.entries:
                self.sizes.popitem(last=False)


def viewed(coll, name):
    """(identity, (width, height) as shown) of an original to view: 404 for a missing file or one that is no
    viewable image (remembered, so a corrupt file is not tried again for every tile)."""
    app = bottle.request.app
    try:
        identity = app.storage.original_identity(coll, name)
        app.thumbnailer.raise_remembered_failure(identity, PYRAMID)
        size = app.view_sizes.get(identity)
        if size is None:
            with app.thumbnailer.admitted():
                ensure_pyramid(coll, name, identity)
                size = app.view_sizes.get(identity) or pyramid_size(coll, name, identity)
        return identity, size
    except FileNotFoundError:
        refuse(404, 'No such file.')
    except ThumbnailError as error:
        refuse(404, str(error))


def ensure_pyramid(coll, name, identity):
    """Build and store the original's pyramid unless a fresh one is stored; one build at a time per original."""
    app = bottle.request.app
    storage, thumbnailer, cache_name = app.storage, app.thumbnailer, pyramid_name(name)
    if name_problem(cache_name):                  # a valid name's can only be too long
        raise ThumbnailError('The file name is too long to name its pyramid.')
    if storage.derivative_is_fresh(coll, name, cache_name):
        return
    with storage.turn_at(coll, name, PYRAMID, False, thumbnailer):
        if storage.derivative_is_fresh(coll, name, cache_name):
            return
        with storage.local_original(coll, name) as source:
            with thumbnailer.pyramid_built(source, storage.staging_folder(), identity) as (made, size):
                if not storage.store_derivative(coll, name, cache_name, made, identity):
                    raise ThumbnailError('The file changed while its pyramid was made: try again.')
        app.view_sizes.remember(identity, size)
        storage.count_stored(coll, cache_name)


def pyramid_size(coll, name, identity):
    """The size of a stored pyramid's full level (its first TIFF page), remembered for the original's identity."""
    app = bottle.request.app
    with app.storage.local_derivative(coll, pyramid_name(name)) as path:
        pages = tiff_pages(path)
    if not pages or not pages[0][0] or not pages[0][1]:
        raise ThumbnailError('This file is not an image that can be viewed.')
    app.view_sizes.remember(identity, pages[0][:2])
    return pages[0][:2]


def iiif_grid(width, height):
    """(tile size, scale factors, sizes) info.json offers, and which answers are cached."""
    limits = iiif_limits()
    return iiif.tile_grid(width, height, min(IIIF_TILE, limits.max_width), limits)


def iiif_limits():
    return bottle.request.app.iiif_limits


def iiif_base(version, coll, name, grant=None):
    """The image service's id: under the same public base URL as web_asset_store.xml (and the viewer grant)."""
    identifier = iiif.identifier_for(coll, name, bottle.request.app.settings.COLLECTION_DIRS)
    granted = f'/grant/{grant}' if grant else ''
    return f'{public_base_url()}/iiif{granted}/{version}/{identifier}'


def linked_data(context):
    """Answer JSON-LD when the client's Accept asks for it, else plain JSON, as the specifications say."""
    linked = 'application/ld+json' in bottle.request.headers.get('Accept', '')
    bottle.response.content_type = f'application/ld+json;profile="{context}"' if linked else 'application/json'


def iiif_redirect(version, identifier, grant=None):
    coll, name = iiif_original(identifier, grant)
    bottle.redirect(iiif_base(version, coll, name, viewer_grant(coll, name, grant)) + '/info.json', 303)


def iiif_info(version, identifier, grant=None):
    version = int(version)
    coll, name = iiif_original(identifier, grant)
    _identity, (width, height) = viewed(coll, name)
    tile, factors, sizes = iiif_grid(width, height)
    grant = viewer_grant(coll, name, grant)
    manifest = iiif_base(3, coll, name, grant) + '/manifest' if version == 3 else None
    document = iiif.info_document(version, iiif_base(version, coll, name, grant), width, height, tile, factors,
                                  sizes, iiif_limits(), manifest=manifest)
    linked_data(iiif.CONTEXT[version])
    return json.dumps(document)


def iiif_manifest(version, identifier, grant=None):
    """A IIIF Presentation 3.0 Manifest of one canvas showing the image, so Mirador and Universal Viewer open it."""
    coll, name = iiif_original(identifier, grant)
    _identity, (width, height) = viewed(coll, name)
    grant = viewer_grant(coll, name, grant)
    service = iiif_base(3, coll, name, grant)
    full = iiif.parse_request(3, 'full', 'max', '0', 'default.jpg', width, height, iiif_limits())
    linked_data(iiif.PRESENTATION_CONTEXT)
    return json.dumps(iiif.manifest_document(service + '/manifest', service, name, (width, height), full.size))


def iiif_image(version, identifier, region, size, rotation, quality_format, grant=None):
    """One image request, cut from the original's pyramid; the tiles and sizes info.json offers (as JPEG in
    colour) are stored after the first time and answered like a cached thumbnail."""
    app = bottle.request.app
    coll, name = iiif_original(identifier, grant)
    identity, (width, height) = viewed(coll, name)
    try:
        plan = iiif.parse_request(int(version), region, size, rotation, quality_format, width, height, iiif_limits())
    except iiif.IIIFError as error:
        refuse(error.status, error.reason)
    headers = {'Cache-Control': IIIF_CACHING[bool(app.settings.REQUIRE_KEY_FOR_GET)]}
    cache_name = iiif.is_offered(plan, width, height, *iiif_grid(width, height)) and tile_name(name, *plan[:2])
    if cache_name and name_problem(cache_name):   # too long to keep: cut each time
        cache_name = None
    fresh = cache_name and app.storage.derivative_is_fresh(coll, name, cache_name, identity)
    if fresh:
        return app.storage.send_derivative(coll, cache_name, headers, plan.content_type, fresh)
    try:
        with app.thumbnailer.admitted():
            ensure_pyramid(coll, name, identity)
            with app.storage.local_derivative(coll, pyramid_name(name)) as pyramid:
                with app.thumbnailer.iiif_cut(pyramid, plan, app.storage.staging_folder()) as made:
                    if cache_name and app.storage.store_derivative(coll, name, cache_name, made, identity):
                        app.storage.count_stored(coll, cache_name)
                        return app.storage.send_derivative(coll, cache_name, headers, plan.content_type)
                    cut = open(made, 'rb')     # read until the answer ends, though its scratch folder goes now
    except FileNotFoundError:
        refuse(404, 'No such file.')
    except ThumbnailError as error:
        refuse(404, str(error))
    size = os.fstat(cut.fileno()).st_size
    return bottle.HTTPResponse(stream_file(cut, size), 200, **headers,
                               **{'Content-Type': plan.content_type, 'Content-Length': str(size)})


def route_iiif(app):
    """The IIIF routes, each also under /iiif/grant/<grant>/, where a viewer's grant stands for the token."""
    for prefix in ('/iiif', '/iiif/grant/<grant>'):
        service = prefix + '/<version:re:[23]>/<identifier>'
        app.route(service, 'GET', iiif_redirect)
        app.route(service + '/info.json', 'GET', iiif_info)
        app.route(prefix + '/<version:re:3>/<identifier>/manifest', 'GET', iiif_manifest)
        app.route(service + '/<region>/<size>/<rotation>/<quality_format>', 'GET', iiif_image)


def create_app(config):
    """The WSGI application for one configuration."""
    os.makedirs(config.BASE_DIR, exist_ok=True)
    storage = make_storage(config)
    storage.sweep_temporaries()
    if storage.cache_size:
        storage.start_cache_sweep()           # counts the cache, in the background
    app = AssetServer(config, storage, Thumbnailer(config), resolve_key(config))
    app.metadata = MetadataReader(config)
    app.read_tokens = ReadTokens(READ_TOKENS_REMEMBERED)
    app.view_sizes = ViewSizes(config.THUMBNAIL_FAILURES_REMEMBERED)
    app.iiif_limits = iiif.Limits(max_width=config.IIIF_MAX_SIZE, max_height=config.IIIF_MAX_SIZE)
    app.install(answer_storage_faults)
    app.install(TokenCheck())
    app.add_hook('before_request', lambda: bottle.response.set_header(
        'Content-Type', 'text/plain; charset=UTF-8'))
    app.add_hook('after_request', discard_upload)
    app.route('/', 'GET', index)
    app.route('/web_asset_store.xml', 'GET', discovery)
    app.route('/capabilities.json', 'GET', capabilities)
    app.route('/fileupload', 'POST', fileupload, signed='store', upload=True)
    app.route('/fileget', 'GET', fileget, signed='filename', read=True)
    app.route('/filedelete', 'POST', filedelete, signed='filename')
    app.route('/getmetadata', 'GET', getmetadata, signed='filename', read=True)
    app.route('/testkey', 'GET', testkey, signed='random')
    app.route('/health', 'GET', health)
    if config.ALLOW_STATIC_FILE_ACCESS:
        app.route('/getfileref', 'GET', getfileref, signed='filename', read=True)
        app.route('/static/<path:path>', 'GET', static)
    route_iiif(app)
    for path in {route.rule for route in app.routes}:
        app.route(path, 'OPTIONS', preflight)
    return app


###############################################################################
# Start-up ####################################################################
###############################################################################

def main():
    """Run the server as configured by settings.py and the environment."""
    try:
        config = load_config()
        start_logging(config)
        app = create_app(config)
    except ConfigError as error:
        sys.exit(f'web asset server cannot start: {error}')
    if config.SERVER == 'paste':
        serve_with_paste(app, config)
    else:
        log_listening(config)
        bottle.run(app, server=config.SERVER, host=config.HOST, port=config.PORT, quiet=True)


class LogFormat(logging.Formatter):
    """'<time> <level> <message>', the date and time to the second formatted once a second (the access log writes
    a line per request), the milliseconds added to each."""
    last = (None, '')

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if self.last[0] != second:
            self.last = (second, time.strftime(self.default_time_format, self.converter(record.created)))
        return self.default_msec_format % (self.last[1], record.msecs)


def start_logging(config):
    """Log to standard error; records carry no thread or process names (nothing logs them, each costs a lookup)."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormat('%(asctime)s %(levelname)s %(message)s'))
    logging.basicConfig(level=logging.DEBUG if config.DEBUG else logging.INFO, handlers=[handler])


def waits_for_conversions(head):
    """Whether a request head asks for what may wait for a conversion: a thumbnail or anything IIIF, its target
    decoded and normalized as the app will see it. The front lets at most conversion_threads() of these hold
    threads (a request it misjudges meets Admission instead)."""
    target = head.split(b'\r\n', 1)[0].split(b'\n', 1)[0].split(b' ')
    if len(target) < 2:
        return False
    parts = urlsplit(target[1].decode('latin-1'))
    path = posixpath.normpath(unquote(parts.path, encoding='latin-1') or '/')
    if path.startswith('/iiif/'):
        return True
    return path in ('/fileget', '/getfileref') and ('type', 'T') in parse_qsl(parts.query, encoding='latin-1')


BODY_LENGTH = re.compile(rb'^(content-length:[ \t]*0*[1-9]|transfer-encoding:)', re.I | re.M)


def waits_its_turn(head):
    """What a request waits for in the front's waiting room: 'conversion' (a thumbnail or IIIF), 'body' (a body
    arrives, at a client's pace, while it holds a thread), or None."""
    if waits_for_conversions(head):
        return 'conversion'
    return 'body' if BODY_LENGTH.search(head) else None


def serve_with_paste(app, config):
    """Bind first, then say where we listen: a port in use ends the start with one clear line."""
    long_threads = max(1, config.THREADS - 5)
    waiting_room = WaitingRoom(waits_its_turn, {'conversion': conversion_threads(config), 'body': long_threads},
                               config.THUMBNAIL_QUEUE_WAIT, total=long_threads)
    try:
        listening = FrontedPasteServer(app, config, waiting_room)
    except OSError as error:
        sys.exit(f'web asset server cannot start: cannot listen on {config.HOST}:{config.PORT}: '
                 f'{error.strerror or error}')
    log_listening(config)
    try:
        listening.serve_forever()
    except KeyboardInterrupt:
        pass


def log_listening(config):
    log.info('Listening on %s:%s; Specify finds this server at %s/web_asset_store.xml',
             config.HOST, config.PORT, f'{config.PUBLIC_SCHEME}://{config.SERVER_NAME}:{config.SERVER_PORT}')


if __name__ == '__main__':
    main()
