"""Hostile input and faults: never a 5xx, never a traceback or a path, nothing touched outside BASE_DIR,
and nothing lost when the disk fills or the server is killed.

Hypothesis runs `HYPOTHESIS_PROFILE=ci` (the default, a few hundred inputs per property) or
`long` (`make soak`); each property prints how many inputs it tried.
"""

import base64
import collections
import errno
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import os
import resource
import signal
import stat
import subprocess
import threading
import time
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.client import Client, KEY, multipart_body
from harness.images import png_bytes
from harness.servers import RunningServer
from config import load_config
from names import TEMP_PREFIX
import tokens
from tokens import make_token

settings.register_profile('ci', max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile('long', max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))

pytestmark = pytest.mark.disk_only
SECRET = b'secret outside the attachments folder'
TRIED = collections.Counter()

PATHS = ['/fileget', '/fileupload', '/filedelete', '/getmetadata', '/testkey', '/getfileref',
         '/web_asset_store.xml', '/', '/health', '/static/originals/a.jpg', '/static/../secret.txt',
         '/static/originals/../../secret.txt', '/static/thumbnails/../../../secret.txt', '/static/originals/../../../../secret.txt']
FIELDS = ['filename', 'store', 'type', 'coll', 'scale', 'token', 'random', 'downloadname', 'dt',
          'disp', 'div', 'inst', 'amp;filename']
HOSTILE = ['../secret.txt', '../../secret.txt', '..', '.', '/', '\\', '\x00', '', 'a.jpg', 'a' * 300,
           '%2e%2e%2fsecret.txt', '.~wast-x.part', 'originals/../../secret.txt', '😀.jpg', '\ud800'[:0] + 'é',
           'null', '-1', '0', '123', '99999999999999999999', 'T', 'O', 'x:1', ':', 'Fish', '&amp;', ' ',
           '{root}/secret.txt', '{root}/up/new.jpg']
# '../' (or '..\\') up to eight times after a lead that keeps the path resolvable, past BASE_DIR (three
# levels below the watched root) and beyond it,
# onto a secret, into a sibling folder, or to a new file; '{root}' becomes the watched root's absolute path.
traversal = st.builds(lambda lead, ups, sep, tail: lead + sep.join(['..'] * ups + [tail]),
                      st.sampled_from(['', './', './/', '{root}/up/mid/attachments/originals/',
                                       '{root}/up/mid/attachments/thumbnails/']),
                      st.integers(1, 8), st.sampled_from(['/', '\\']),
                      st.sampled_from(['secret.txt', 'sibling/secret.txt', 'mid/secret.txt', 'new.jpg',
                                       'originals/a.jpg', 'attachments/originals/a.jpg']))
text = st.one_of(st.sampled_from(HOSTILE), traversal, st.text(max_size=40),
                 st.text(st.characters(codec='utf-8'), max_size=300))
SECRETS = ['secret.txt', 'sibling/secret.txt', 'up/secret.txt', 'up/sibling/secret.txt', 'up/mid/secret.txt',
           'up/mid/sibling/secret.txt', 'up/mid/attachments.old/originals/secret.txt']


@pytest.fixture(scope='module')
def fuzzed(tmp_path_factory):
    """A server on root/up/mid/attachments, secrets at every level above it and in sibling folders, and a
    valid file inside it."""
    root = tmp_path_factory.mktemp('fuzz')
    for relative in SECRETS:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(SECRET)
    base = root / 'up' / 'mid' / 'attachments'
    client = Client(load_config({'BASE_DIR': str(base), 'KEY': KEY, 'ACCESS_LOG': False,
                                        'PREGENERATE_SCALE': None, 'THUMBNAIL_TIMEOUT': 10}, environ={}))
    client.upload('a.jpg', png_bytes(40, 30))
    client.fileget('a.jpg', 'T', scale='10')            # a thumbnails folder too, so ../ resolves through it
    yield client, root
    print(f'\ninputs tried: {dict(TRIED)}')


def rooted(value, root):
    """A generated value with '{root}' made the watched root's absolute path."""
    return value.replace('{root}', str(root)) if isinstance(value, str) else value


def outside(root):
    """Every path under root but outside BASE_DIR (the whole tree above it), with its size and mtime."""
    base = os.path.join(str(root), 'up', 'mid', 'attachments')
    found = {}
    for folder, dirs, files in os.walk(root):
        if folder == base or folder.startswith(base + os.sep):
            continue
        for name in files + dirs:
            path = os.path.join(folder, name)
            if path != base:
                info = os.lstat(path)
                found[path] = (info.st_size, info.st_mtime_ns)
    return found


def assert_safe(answer, root, before):
    """The invariants every answer keeps."""
    assert answer.status_int < 500, answer.body[:300]
    assert 'X-Timestamp' in answer.headers
    assert b'Traceback' not in answer.body and SECRET not in answer.body
    assert str(root).encode() not in answer.body and str(root).encode() not in str(answer.headers).encode()
    assert outside(root) == before


def signed(params, name_field):
    """Sometimes sign the request properly, so the checks behind the token are reached too."""
    value = params.get(name_field)
    if isinstance(value, str) and 'token' not in params:
        params['token'] = make_token(KEY, value)
    return params


@given(path=st.sampled_from(PATHS), method=st.sampled_from(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'OPTIONS']),
       params=st.dictionaries(st.sampled_from(FIELDS), text, max_size=7), sign=st.booleans(),
       escaped=st.booleans(), headers=st.dictionaries(
           st.sampled_from(['Range', 'If-Modified-Since', 'If-None-Match', 'If-Range', 'X-Forwarded-Host',
                            'X-Forwarded-Proto', 'X-Forwarded-Port', 'Content-Type']), st.text(
               st.characters(min_codepoint=32, max_codepoint=126), max_size=40), max_size=3))
def test_any_request_line_is_answered_safely(fuzzed, path, method, params, sign, escaped, headers):
    client, root = fuzzed
    before = outside(root)
    params = {name: rooted(value, root) for name, value in params.items()}
    if sign:
        params = signed(params, {'/fileupload': 'store', '/testkey': 'random'}.get(path, 'filename'))
    query = urlencode(params, quote_via=quote)
    if escaped:
        query = query.replace('&', '&amp;')
    answer = client.unlinted.request(f'{path}?{query}', method=method, headers=headers, expect_errors=True)
    TRIED['request lines'] += 1
    assert_safe(answer, root, before)


@given(fields=st.lists(st.tuples(st.sampled_from(FIELDS + ['file', 'x']), text), max_size=8),
       store=st.one_of(st.none(), text), kind=st.sampled_from([None, 'O', 'T', 'x']),
       file_name=st.one_of(st.none(), text), data=st.binary(max_size=2000), file_first=st.booleans(),
       sign=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 3000)),
       boundary=st.sampled_from(['b', 'specify-boundary', '----WebKitFormBoundaryx']))
def test_any_upload_body_is_answered_safely(fuzzed, fields, store, kind, file_name, data, file_first, sign, cut,
                                            boundary):
    client, root = fuzzed
    before = outside(root)
    fields = [(name, rooted(value, root)) for name, value in fields if '"' not in name]
    fields += [('store', rooted(store, root))] * (store is not None) + [('type', kind)] * (kind is not None)
    file_name = rooted(file_name, root)
    if sign:
        store = dict(fields).get('store')
        if store is not None:
            fields.append(('token', make_token(KEY, store)))
    parts = list(fields)
    if file_name is not None:
        part = ('file', file_name.replace('"', ''), data)
        parts = [part] + parts if file_first else parts + [part]
    content_type, body = multipart_body(parts, boundary=boundary)
    if cut is not None:
        body = body[:cut]
    answer = client.post_raw('/fileupload', content_type, body, status='*')
    TRIED['upload bodies'] += 1
    assert_safe(answer, root, before)
    assert not client.leftovers()


@given(body=st.binary(max_size=500), content_type=st.sampled_from([
    'application/x-www-form-urlencoded', 'multipart/form-data', 'multipart/form-data; boundary=',
    'text/plain', 'application/json', 'multipart/form-data; boundary="unterminated']))
def test_any_post_body_to_any_endpoint_is_answered_safely(fuzzed, body, content_type):
    client, root = fuzzed
    before = outside(root)
    for path in ('/fileupload', '/filedelete'):
        answer = client.post_raw(path, content_type, body, status='*')
        TRIED['post bodies'] += 1
        assert_safe(answer, root, before)


TRAVERSED = {'fileget O': 400, 'fileget T': 400, 'getmetadata': 400, 'getfileref O': 400, 'getfileref T': 400,
             'filedelete': 400, 'fileupload': 400, 'static': 404}


@given(endpoint=st.sampled_from(sorted(TRAVERSED)), name=st.one_of(traversal, st.sampled_from(HOSTILE[-2:])))
def test_any_traversing_name_is_refused_and_touches_nothing_above_base_dir(fuzzed, endpoint, name):
    client, root = fuzzed
    before = outside(root)
    name = rooted(name, root)
    path, _, kind = endpoint.partition(' ')
    if endpoint == 'fileupload':
        answer = client.upload(name, b'written over?', status='*')
    elif endpoint == 'static':
        answer = client.unlinted.get('/static/originals/' + quote(name, safe='/\\'), expect_errors=True)
    elif endpoint == 'filedelete':
        answer = client.delete(name, status='*')
    else:
        answer = client.get('/' + path, {'filename': name, 'type': kind or 'O', 'scale': '10', 'dt': 'json',
                                         'coll': 'Fish', 'token': client.token(name)}, status='*')
    TRIED['traversing names'] += 1
    assert_safe(answer, root, before)
    assert answer.status_int == TRAVERSED[endpoint]


def test_the_files_inside_and_above_survive_the_fuzzing(fuzzed):
    client, root = fuzzed
    assert [(root / relative).read_bytes() for relative in SECRETS] == [SECRET] * len(SECRETS)
    assert client.fileget('a.jpg', coll='any').status_int == 200


# --- Tokens -------------------------------------------------------------------------------------

def test_digests_are_compared_in_constant_time(client, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(tokens.hmac, 'compare_digest', lambda a, b: calls.append((a, b)) or real(a, b))
    client.get('/testkey', {'random': '1', 'token': client.token('1')})
    client.get('/testkey', {'random': '1', 'token': '0' * 32 + f':{int(time.time())}'}, status=403)
    assert len(calls) == 2


def test_a_replayed_token_for_one_file_cannot_read_another(make_client, png):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.png', png)
    client.upload('b.png', png)
    client.fileget('b.png', token=client.token('a.png'), status=403)


# --- Faults ---------------------------------------------------------------------------------------

def limit_file_size(size):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def upload_over_http(web, name, data):
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'),
                                         ('token', make_token(KEY, name))])
    return web.request('POST', '/fileupload', body, {'Content-Type': content_type})


def test_a_file_size_limit_hit_during_an_upload_is_507_leaves_nothing_and_the_server_goes_on(tmp_path):
    web = RunningServer(tmp_path / 'attachments', tmp_path / 'server.log', preexec_fn=limit_file_size(4 * 2**20),
                        ACCESS_LOG='false', PREGENERATE_SCALE='none')
    try:
        status, headers, body = upload_over_http(web, 'big.tif', os.urandom(6 * 2**20))
        assert (status, body) == (507, b'The server has no room to store this file.')
        assert 'X-Timestamp' in headers
        files = [p for p in (tmp_path / 'attachments').rglob('*') if p.is_file() and p.name != '.web-asset-server.key']
        assert files == []
        assert upload_over_http(web, 'small.png', png_bytes(10, 10))[2] == b'Ok.'
    finally:
        web.stop()


@pytest.fixture
def small_disk():
    """Mount a tmpfs of a given size on a folder (root only), unmounted after the test: a disk that really fills."""
    mounted = []

    def mount(folder, size, inodes=None):
        folder.mkdir(parents=True, exist_ok=True)
        options = f'size={size},mode=0755' + (f',nr_inodes={inodes}' if inodes else '')
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                                capture_output=True, text=True, timeout=30)
        if result.returncode:
            pytest.skip('mounting a small tmpfs needs root: ' + result.stderr.strip())
        mounted.append(folder)
        return folder
    yield mount
    for folder in reversed(mounted):
        subprocess.run(['umount', '--lazy', str(folder)], check=True, timeout=30)


NO_ROOM = 'The server has no room to store this file.'


def assert_refused_for_room_keeping(client, answer, name, old):
    """507 with its reason, the old original byte for byte, and no temporary or staged file left."""
    assert (answer.status_int, answer.text) == (507, NO_ROOM)
    assert client.all_files() == {'originals/' + name}
    assert client.stored('originals/' + name) == old
    assert client.leftovers() == []


def test_a_disk_that_fills_while_an_upload_is_received_is_507_and_keeps_the_old_original(make_client, tmp_path,
                                                                                          small_disk):
    client = make_client(BASE_DIR=str(small_disk(tmp_path / 'attachments', '1m')))
    old = os.urandom(100_000)
    client.upload('scan.tif', old)
    answer = client.upload('scan.tif', os.urandom(3 * 2**20), status='*')
    assert_refused_for_room_keeping(client, answer, 'scan.tif', old)
    assert client.upload('small.png', png_bytes(10, 10)).text == 'Ok.'      # the room it took is free again


def test_a_disk_that_fills_while_the_upload_is_copied_into_place_is_507_and_keeps_the_old_original(
        make_client, tmp_path, small_disk):
    client = make_client()
    small_disk(tmp_path / 'attachments' / 'originals', '1m')     # originals on their own, small file system
    old = os.urandom(100_000)
    client.upload('scan.tif', old)
    answer = client.upload('scan.tif', os.urandom(2 * 2**20), status='*')
    assert_refused_for_room_keeping(client, answer, 'scan.tif', old)


def fill_up(path):
    """Write a file until the file system holding it has not one page left."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b'\0' * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def test_a_full_disk_found_only_when_the_upload_is_flushed_is_507_and_leaves_nothing(make_client, tmp_path,
                                                                                       small_disk):
    base = small_disk(tmp_path / 'attachments', '1m')
    client = make_client(BASE_DIR=str(base))
    fill_up(base / 'filler')
    answer = client.upload('small.png', png_bytes(10, 10), status='*')      # smaller than the write buffer
    assert (answer.status_int, answer.text) == (507, NO_ROOM)
    assert client.leftovers() == []


def use_every_inode(folder):
    """Make empty files in `folder` until its file system has no inode left."""
    for number in range(100_000):
        try:
            open(folder / f'filler-{number}', 'x').close()
        except OSError as error:
            assert error.errno == errno.ENOSPC
            return
    raise AssertionError('the file system did not run out of inodes')


@pytest.mark.parametrize('thumbnails_folder', [False, True])
def test_a_thumbnail_asked_for_when_the_disk_has_no_inodes_left_is_507_and_leaves_nothing(make_client, tmp_path,
                                                                                            small_disk, thumbnails_folder):
    base = small_disk(tmp_path / 'attachments', '8m', inodes=64)
    client = make_client(BASE_DIR=str(base))
    client.upload('a.png', png_bytes(40, 30))
    if thumbnails_folder:               # then what fails is the scratch folder inside it
        client.fileget('a.png', 'T', scale='20')
    use_every_inode(base)
    answer = client.fileget('a.png', 'T', scale='10', status='*')
    assert (answer.status_int, answer.text) == (507, 'The server has no room to make this thumbnail.')
    assert 'X-Timestamp' in answer.headers
    assert client.leftovers() == []


def refuse_for_room(monkeypatch, name, applies):
    """Make the OS call os.<name> fail with ENOSPC when `applies` to its arguments, as a full disk does."""
    real = getattr(os, name)

    def call(*args, **kwargs):
        if applies(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, call)


def test_no_room_for_the_rename_into_place_is_507_and_keeps_the_old_original(make_client, monkeypatch):
    client = make_client()
    old = os.urandom(100_000)
    client.upload('scan.tif', old)
    originals = client.path('originals')
    refuse_for_room(monkeypatch, 'replace', lambda source, target: os.path.dirname(target) == originals)
    answer = client.upload('scan.tif', os.urandom(200_000), status='*')
    assert_refused_for_room_keeping(client, answer, 'scan.tif', old)


def test_no_room_reported_by_fsync_of_the_copy_is_507_and_keeps_the_old_original(make_client, tmp_path, small_disk,
                                                                                  monkeypatch):
    client = make_client()
    originals = str(small_disk(tmp_path / 'attachments' / 'originals', '8m'))     # copied across file systems
    old = os.urandom(100_000)
    client.upload('scan.tif', old)

    def a_file_in_originals(descriptor):
        return (stat.S_ISREG(os.fstat(descriptor).st_mode)
                and os.path.dirname(os.readlink(f'/proc/self/fd/{descriptor}')) == originals)
    refuse_for_room(monkeypatch, 'fsync', a_file_in_originals)     # delayed allocation reports ENOSPC here
    answer = client.upload('scan.tif', os.urandom(200_000), status='*')
    assert_refused_for_room_keeping(client, answer, 'scan.tif', old)


UPLOADS_IN_FLIGHT = 60


def test_uploads_answered_ok_survive_sigkill_complete_and_byte_identical(tmp_path):
    """60 uploads in flight at once, each from a client address of its own and with a thread of its own in the
    server (THREADS - 5 may take request bodies), each half sent before any goes on; killed once 20 are answered."""
    base = tmp_path / 'attachments'
    web = RunningServer(base, tmp_path / 'first.log', ACCESS_LOG='false', PREGENERATE_SCALE='none',
                        THREADS=str(UPLOADS_IN_FLIGHT + 10))
    payloads = {f'upload-{i}.bin': os.urandom(int.from_bytes(os.urandom(3), 'big') % (3 * 2**20) + 1)
                for i in range(UPLOADS_IN_FLIGHT)}
    answered, lock = set(), threading.Lock()
    all_sending = threading.Barrier(UPLOADS_IN_FLIGHT)

    def send(numbered):
        number, name = numbered
        content_type, body = multipart_body([('file', name, payloads[name]), ('store', name), ('type', 'O'),
                                             ('token', make_token(KEY, name))])

        def halves():
            yield body[:len(body) // 2]
            all_sending.wait(60)               # every upload is in flight, half sent, before any goes on
            yield body[len(body) // 2:]
        try:
            if web.request('POST', '/fileupload', halves(), {'Content-Type': content_type,
                                                             'Content-Length': str(len(body))},
                           source=f'127.0.0.{2 + number}')[2] == b'Ok.':
                with lock:
                    answered.add(name)
                    if len(answered) == 20:              # kill it mid-run, with uploads in flight
                        os.kill(web.process.pid, signal.SIGKILL)
        except (OSError, http.client.HTTPException):         # cut off by the kill: not answered Ok.
            pass
    with concurrent.futures.ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:
        list(pool.map(send, enumerate(payloads)))
    web.process.wait(10)
    web.stop()
    print(f'\n{len(answered)} of {len(payloads)} uploads answered Ok. before SIGKILL')
    assert 0 < len(answered) < len(payloads)
    stored = {p.name: p.read_bytes() for p in (base / 'originals').iterdir() if not p.name.startswith(TEMP_PREFIX)}
    assert answered <= set(stored)
    for name, data in stored.items():
        assert data == payloads[name], f'{name} is not what was sent'
    again = RunningServer(base, tmp_path / 'second.log', ACCESS_LOG='false', PREGENERATE_SCALE='none')
    try:
        for name in answered:
            assert again.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))[2] == payloads[name]
        for name, data in payloads.items():         # a checksum with every file stored, none without one
            status, headers, _ = again.request('HEAD', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))
            digest = hashlib.sha256(data).hexdigest()
            listed = json.loads(again.request('GET', '/filesbychecksum?' + urlencode(
                {'sha256': digest, 'token': make_token(KEY, digest)}))[2])['names']
            if name in stored:
                assert (status, headers['Repr-Digest'], listed) == (
                    200, 'sha-256=:' + base64.b64encode(hashlib.sha256(data).digest()).decode() + ':', [name])
            else:
                assert (status, listed) == (404, [])
        leftovers = [p.name for p in base.rglob(TEMP_PREFIX + '*')]
        for name in leftovers:
            assert again.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))[0] == 400
    finally:
        again.stop()


def test_a_corrupt_image_gets_a_clean_404_and_the_next_request_works(client, png):
    client.upload('broken.png', png[:len(png) // 2])
    client.fileget('broken.png', 'T', scale='50', status=404)
    client.upload('fine.png', png)
    assert client.fileget('fine.png', 'T', scale='50').status_int == 200


def test_hashes_of_what_was_stored_match_what_was_sent(client):
    sent = {f'{i}.bin': os.urandom(1000 * i + 1) for i in range(10)}
    for name, data in sent.items():
        client.upload(name, data)
    for name, data in sent.items():
        assert hashlib.sha256(client.fileget(name).body).hexdigest() == hashlib.sha256(data).hexdigest()
