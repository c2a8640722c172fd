"""Answers for stored files, for every storage alike: validators (ETag, Last-Modified, 304), one byte range
(206, 416), sandboxing of content that might run scripts, and the hand-over of a file on disk to the web server
in front (FILE_OFFLOAD). Part of the app: this is where HTTP meets what a storage `found`."""

import email.utils
import functools
import inspect
import os
import re
from urllib.parse import quote

import bottle

from errors import ObjectChanged
from kinds import may_run_scripts, kind_of

CONTROL_CHARACTER = re.compile(r'[\x00-\x1f\x7f]')


def stored_answer(storage, parts, mimetype=None, headers=None, seen=None):
    """The answer to a GET or HEAD of the stored file at `parts` (mimetype None: as stored, or told from its
    bytes); read once more if it changed while it was read."""
    try:
        return answer_once(storage, parts, mimetype, headers, seen)
    except ObjectChanged:
        return answer_once(storage, parts, mimetype, headers, None)


def answer_once(storage, parts, mimetype, headers, seen):
    config = bottle.request.app.settings
    path = storage.local_path(parts)
    if config.FILE_OFFLOAD and path and not (config.FILE_OFFLOAD == 'apache' and CONTROL_CHARACTER.search(path)):
        return handed_over(path, mimetype, headers, config, storage.recorded_checksum(parts))
    found = storage.found(parts, whole=is_plain_get(), seen=seen)
    if found.checksum:
        headers = dict(headers or {}, **{'Repr-Digest': found.checksum.repr_digest()})
    answer = file_answer(found.size, found.etag, found.modified,
                         mimetype or found.content_type or 'application/octet-stream', headers, found.body)
    if not inspect.isgenerator(answer.body):
        found.close()
    return answer


def handed_over(path, mimetype, headers, config, checksum=None):
    """An empty answer telling the web server in front to send the file at `path` (X-Accel-Redirect for nginx,
    X-Sendfile, as it is, for Apache's mod_xsendfile 0.12, which reads it raw), with an original's checksum."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if mimetype is None:
        with open(path, 'rb') as handle:
            mimetype = kind_of(handle.read(1024)) or 'application/octet-stream'
    handover = {'Content-Type': mimetype, 'X-Content-Type-Options': 'nosniff'}
    if may_run_scripts(mimetype):
        handover['Content-Security-Policy'] = 'sandbox'
    if checksum:
        handover['Repr-Digest'] = checksum.repr_digest()
    if config.FILE_OFFLOAD == 'nginx':
        relative = os.path.relpath(path, config.BASE_DIR).replace(os.sep, '/')
        handover['X-Accel-Redirect'] = config.OFFLOAD_PREFIX + quote(relative)
    else:
        handover['X-Sendfile'] = path
    return bottle.HTTPResponse('', 200, **(headers or {}), **handover)


def is_plain_get():
    """A GET without Range or validators: its answer is the whole file, so a store may fetch it at once."""
    environ = bottle.request.environ
    return environ['REQUEST_METHOD'] == 'GET' and not any(
        field in environ for field in ('HTTP_RANGE', 'HTTP_IF_NONE_MATCH', 'HTTP_IF_MODIFIED_SINCE'))


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
