"""Web Asset Server for Specify: stores attachments and makes their thumbnails.

Specify 6 and 7 reach this server through views/web_asset_store.xml and sign each request with an HMAC-MD5
token over a shared key (docs/internals.md). This is the one Bottle application and the entry point: run it with
`python server.py` (Paste serves it, behind front.py). Sections: request plumbing, the token check, the
application, routes, IIIF routes, start-up.

Imports run one way (docs/internals.md has the map): settings -> shared pieces (names, files, checksums, audit,
kinds, errors, config, tokens) -> storages/ and engines/ -> cache (the derivative cache) and trash -> front, iiif,
answers, uploads -> server (this) -> derivatives.py, migrate.py and preservation.py (administration commands).
"""

import contextlib
import functools
import json
import logging
import os
import posixpath
import re
import sys
import time
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import bottle

import iiif
from audit import AuditLog
from checksums import SHA256
from files import NO_SPACE, stream_file
from answers import stored_answer
from cache import DerivativeCache
from config import HERE, VERSION, ConfigError, conversion_threads, load_config
from engines.imagemagick import ImageMagick
from engines.metadata import MetadataLimitExceeded, MetadataReader
from engines.scheduling import Scheduler
from engines.vips import IIIF_KINDS, Vips
from errors import MetadataBusy, Refused, StorageUnavailable, ThumbnailError, ThumbnailsBusy, UnknownCollection
from front import FrontedPasteServer
from waiting_room import WaitingRoom
from kinds import sniff_kind, type_by_name
from names import name_problem, printable, thumbnail_name, thumbnail_source
from storages import make_storage
from trash import Trash
from tokens import ReadTokens, grant_problem, new_grant, resolve_key, token_problem
from uploads import receive_upload

VIEWS_DIR = os.path.join(HERE, 'views')
RETRY_AFTER = 5                  # Seconds a client told 503 (conversions busy, storage unavailable) is asked to wait.
READ_TOKENS_REMEMBERED = 100_000     # tokens read with that are remembered, so that they cannot write (ReadTokens)
IIIF_TILE = 512                 # the tile size info.json offers
IIIF_CACHING = {False: 'public, max-age=86400',     # IIIF image answers: a replaced original shows within a day
                True: 'private, max-age=3600'}     # with REQUIRE_KEY_FOR_GET: never in a shared cache

log = logging.getLogger('web_asset_server')


# --- Request plumbing -------------------------------------------------------------------------------------------

def refuse(status, reason):
    """Stop the request with a short plain-text answer."""
    raise bottle.HTTPError(status, reason)


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


def valid_type(text):
    if text not in ('O', 'T'):
        refuse(400, 'Bad type: it must be O (original) or T (thumbnail).')
    return text


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


# --- The token check --------------------------------------------------------------------------------------------

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


# --- The application --------------------------------------------------------------------------------------------

class AssetServer(bottle.Bottle):
    """The Bottle app, stamping every answer (errors too) with X-Timestamp and CORS."""
    clock = staticmethod(time.time)     # when a request started, for its token's age; a test may set an app's own

    def __init__(self, config, storage, key):
        super().__init__()
        self.settings, self.storage, self.key = config, storage, key
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


def answer_faults(callback):
    """Bottle plugin: what the layers below raise, answered. A refusal with its status, an unknown collection or
    a missing file 404; a storage that cannot be reached, or conversions or metadata readers too busy to take
    more, 503 with Retry-After."""
    @functools.wraps(callback)
    def guarded(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Refused as refusal:
            raise bottle.HTTPError(refusal.status, refusal.reason) from None
        except UnknownCollection as error:
            raise bottle.HTTPError(404, str(error)) from None
        except StorageUnavailable as error:
            raise bottle.HTTPError(503, f'The storage is unavailable: {error}',
                                   **{'Retry-After': str(RETRY_AFTER)}) from None
        except ThumbnailsBusy:
            raise bottle.HTTPError(503, 'Too many thumbnails are being made: try again shortly.',
                                   **{'Retry-After': str(RETRY_AFTER)}) from None
        except MetadataBusy as busy:
            raise bottle.HTTPError(503, str(busy), **{'Retry-After': str(busy.retry_after)}) from None
    return guarded


def send_stored(parts, mimetype=None, headers=None, seen=None):
    """The stored file at `parts` as an answer (mimetype None: as stored, or told from its bytes); 404 when none."""
    try:
        return stored_answer(bottle.request.app.storage, parts, mimetype, headers, seen)
    except FileNotFoundError:
        refuse(404, 'No such file.')


def require_original(coll, name):
    """404 unless the original is stored."""
    if not bottle.request.app.storage.exists(coll, name):
        refuse(404, 'No such file.')


def ensure_thumbnail(coll, name, scale, webp=False, answerable=False):
    """Make the thumbnail a request asks for: 404 when it cannot be made, 507 when the disk has no room
    (no space or no inode) for it or its scratch folder. `answerable`: a browser's WebP may be answered by
    the plain thumbnail until it is made (DerivativeCache.ensure_answerable_thumbnail)."""
    cache = bottle.request.app.cache
    try:
        if answerable:
            return cache.ensure_answerable_thumbnail(coll, name, scale, webp)
        return cache.ensure_thumbnail(coll, name, scale, webp)
    except ThumbnailError as error:
        refuse(404, str(error))
    except OSError as error:
        if error.errno in NO_SPACE:
            refuse(507, 'The server has no room to make this thumbnail.')
        raise


# --- Routes -------------------------------------------------------------------------------------------------------

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
    thumbnailed = sorted(app.imagemagick.usable_kinds())
    bottle.response.content_type = 'application/json'
    bottle.response.set_header('Cache-Control', 'public, max-age=300')
    return json.dumps({
        'server': 'Web Asset Server for Specify',
        'version': VERSION,
        'maxUploadBytes': config.MAX_UPLOAD_SIZE,
        'tokenRequiredForGet': bool(config.REQUIRE_KEY_FOR_GET),
        'thumbnails': {'types': thumbnailed, 'maxScale': config.MAX_THUMBNAIL_SCALE,
                       'pregeneratedScales': config.PREGENERATE_SCALES, 'webp': bool(config.WEBP_THUMBNAILS)},
        'checksums': {'algorithms': ['sha-256', 'md5'], 'reprDigest': 'sha-256',
                      'lookup': base + '/filesbychecksum'},
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
    pregenerate = bool(scales) and sniff_kind(upload.staged) in app.imagemagick.kinds
    checksum = upload.checksum
    with audited('upload', coll, name, size=checksum.size, sha256=checksum.sha256) as change:
        try:
            change['action'] = 'replace' if app.storage.save(coll, name, upload.staged, checksum) else 'upload'
        except OSError as error:
            if error.errno in NO_SPACE:
                refuse(507, 'The server has no room to store this file.')
            raise
    upload.staged = None
    app.cache.original_changed(coll, name)
    if pregenerate:
        app.cache.pregenerate(coll, name, scales)
    return 'Ok.'


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
        return send_stored(app.storage.original_parts(coll, name), type_by_name(name), headers)
    webp = app.settings.WEBP_THUMBNAILS and accepts_webp(bottle.request.headers.get('Accept', ''))
    seen, webp = ensure_thumbnail(coll, name, scale, webp, answerable=True)     # 404 without an original
    if app.settings.WEBP_THUMBNAILS:
        headers = dict(headers or {}, Vary='Accept')
    return send_stored(app.storage.derivative_parts(coll, thumbnail_name(name, scale, webp)), None, headers, seen)


def accepts_webp(accept):
    """Whether an Accept header names image/webp with a quality above 0 (`*/*` does not: Java's default has it)."""
    for item in accept.split(','):
        media_type, *parameters = [part.strip().lower() for part in item.split(';')]
        if media_type == 'image/webp':
            quality = [p[2:].strip() for p in parameters if p.startswith('q=')]
            return not quality or not re.fullmatch(r'0(\.0{0,3})?', quality[0])
    return False


def filedelete():
    app = bottle.request.app
    name, coll = valid_name(param('filename'), 'filename'), param('coll')
    try:
        checksum = app.storage.checksum(coll, name)
    except FileNotFoundError:
        refuse(404, 'No such file.')
    with audited('delete', coll, name, size=checksum and checksum.size, sha256=checksum and checksum.sha256) as change:
        deleted = app.trash.delete(coll, name)
        if not deleted:
            refuse(404, 'No such file.')
        if deleted is not True:
            change['trash'] = deleted.id
    app.cache.original_changed(coll, name)
    return 'Ok.'


@contextlib.contextmanager
def audited(action, coll, name, **facts):
    """Record a change in the audit log once it is done or refused (its outcome: ok, or the status and reason);
    the `change` yielded may correct the action."""
    change = {'action': action}
    environ = bottle.request.environ
    client = environ.get('wast.client') or environ.get('REMOTE_ADDR')
    outcome = '500 internal error'
    try:
        yield change
        outcome = 'ok'
    except bottle.HTTPError as error:
        outcome = f'{error.status_code} {error.body}'
        raise
    except Refused as refusal:
        outcome = f'{refusal.status} {refusal.reason}'
        raise
    except UnknownCollection:
        outcome = '404 unknown collection'
        raise
    except StorageUnavailable:
        outcome = '503 storage unavailable'
        raise
    finally:
        bottle.request.app.audit.record(outcome=outcome, coll=coll, name=name, client=client, **facts, **change)


def filesbychecksum():
    """The names of the collection's originals whose SHA-256 is the one asked (an importer skips what is stored):
    JSON, private. The token signs the SHA-256 as it is sent."""
    sha256 = param('sha256') or ''
    if not SHA256.fullmatch(sha256):
        refuse(400, 'Bad sha256: it must be 64 lowercase hexadecimal digits.')
    names = bottle.request.app.storage.names_with_sha256(param('coll'), sha256)
    bottle.response.content_type = 'application/json'
    bottle.response.set_header('Cache-Control', 'private, no-store')
    return json.dumps({'sha256': sha256, 'names': names})


def purge_trash_when_due():
    """Before a request: once an hour, purge the trash of what is past TRASH_DAYS, in the background."""
    app = bottle.request.app
    if app.trash.purge_due():
        app.trash.purge_in_background()


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
    checks = {'storage': app.storage.health(), 'thumbnails': app.imagemagick.health()}
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
        parts = app.storage.derivative_parts(coll, thumbnail_name(name, scale))
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
    if not app.storage.is_static_parts(parts):
        refuse(404, 'No such file.')
    return send_stored(parts, None if parts[-2] == app.settings.THUMB_DIR else type_by_name(parts[-1]))


# --- IIIF Image API (deep zoom) -----------------------------------------------------------------------------------

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


def viewed(coll, name):
    """(identity, (width, height) as shown) of an original to view: 404 for a missing file or one that is no
    viewable image (remembered, so a corrupt file is not tried again for every tile)."""
    try:
        return bottle.request.app.cache.viewed(coll, name)
    except FileNotFoundError:
        refuse(404, 'No such file.')
    except ThumbnailError as error:
        refuse(404, str(error))


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
    cache_name, fresh = None, False
    if iiif.is_offered(plan, width, height, *iiif_grid(width, height)):
        cache_name, fresh = app.cache.cached_answer(coll, name, plan, identity)
    if fresh:
        return send_stored(app.storage.derivative_parts(coll, cache_name), plan.content_type, headers, fresh)
    try:
        with app.cache.cut(coll, name, plan, identity, cache_name) as (stored, made):
            if stored:
                return send_stored(app.storage.derivative_parts(coll, cache_name), plan.content_type, headers)
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
    app = AssetServer(config, storage, resolve_key(config))
    app.scheduler = Scheduler(config, conversion_threads(config))
    app.imagemagick = ImageMagick(config, app.scheduler)
    app.vips = Vips(config, app.scheduler, app.imagemagick)
    app.cache = DerivativeCache(config, storage, app.scheduler, app.imagemagick, app.vips)
    if app.cache.cache_size:
        app.cache.start_cache_sweep()           # counts the cache, in the background
    app.metadata = MetadataReader(config)
    app.audit = AuditLog(config.AUDIT_LOG)
    app.trash = Trash(config, storage, app.audit)
    app.read_tokens = ReadTokens(READ_TOKENS_REMEMBERED)
    app.iiif_limits = iiif.Limits(max_width=config.IIIF_MAX_SIZE, max_height=config.IIIF_MAX_SIZE)
    app.install(answer_faults)
    app.install(TokenCheck())
    app.add_hook('before_request', lambda: bottle.response.set_header(
        'Content-Type', 'text/plain; charset=UTF-8'))
    app.add_hook('after_request', discard_upload)
    app.add_hook('before_request', purge_trash_when_due)
    app.route('/', 'GET', index)
    app.route('/web_asset_store.xml', 'GET', discovery)
    app.route('/capabilities.json', 'GET', capabilities)
    app.route('/fileupload', 'POST', fileupload, signed='store', upload=True)
    app.route('/fileget', 'GET', fileget, signed='filename', read=True)
    app.route('/filedelete', 'POST', filedelete, signed='filename')
    app.route('/getmetadata', 'GET', getmetadata, signed='filename', read=True)
    app.route('/filesbychecksum', 'GET', filesbychecksum, signed='sha256')
    app.route('/testkey', 'GET', testkey, signed='random')
    app.route('/health', 'GET', health)
    if config.ALLOW_STATIC_FILE_ACCESS:
        app.route('/getfileref', 'GET', getfileref, signed='filename', read=True)
        app.route('/static/<path:path>', 'GET', static)
    route_iiif(app)
    for path in {route.rule for route in app.routes}:
        app.route(path, 'OPTIONS', preflight)
    return app


# --- Start-up -----------------------------------------------------------------------------------------------------

def main():
    """Run the server as configured by settings.py and the environment."""
    try:
        config = load_config()
        start_logging(config)
        app = create_app(config)
    except ConfigError as error:
        sys.exit(f'web asset server cannot start: {error}')
    app.trash.purge_in_background()             # what passed TRASH_DAYS while the server was down
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
