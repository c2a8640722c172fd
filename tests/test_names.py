"""Names are checked before any file system call: nothing outside BASE_DIR, clear 400s."""

import hashlib
import json
import os

import pytest

from harness.images import with_exif
from names import thumbnail_name

# '{parent}' stands for the test's folder: an absolute name that lands in it, not in the real /.
HOSTILE = ['../escape.jpg', '../../escape.jpg', '../../../escape.jpg', '../../../../escape.jpg',
           '../../etc/passwd', '../thumbnails/x.jpg', 'a/b.jpg', '{parent}/abs.jpg', '..', '.', 'a\\b.jpg',
           '..\\..\\win.jpg', 'nul\0byte.jpg', '', 'é' * 128, '.~wast-0123.part']
FRIENDLY = ['Käfer 🐞 (1).jpg', 'name with spaces.JPG', '-rf', ' leading space', 'a%2Fb.jpg',
            '...', '.hidden', 'x' * 255, 'é' * 127 + '.', "quote'\"<>|?*.jpg", '[0].jpg', '%d%s.jpg']
SCALE = 123


@pytest.fixture
def deep_client(make_client, tmp_path):
    """A client whose BASE_DIR is tmp_path/a/b/attachments, so four levels of ../ stay inside tmp_path."""
    client = make_client(BASE_DIR=str(tmp_path / 'a' / 'b' / 'attachments'))
    for folder in ('originals', 'thumbnails'):            # as on a server in use: ../ resolves through them
        os.makedirs(client.path(folder))
    return client


def resolved(client, folder, name):
    """Where `folder`/`name` would land if the name were not checked; None when no file can be there."""
    if '\0' in name or len(name.encode()) > 255:
        return None
    path = os.path.normpath(os.path.join(client.base, folder, name))
    return None if os.path.isdir(path) else path


def plant_canaries(client, name, jpeg, thumbnail):
    """Files exactly where the name's original and, when asked, its fresh cached thumbnail would be:
    {path: (bytes, marker)}. The original is a JPEG whose EXIF Make is its marker, so getmetadata shows it."""
    planted = {}
    marker = 'canary-original-' + hashlib.md5(name.encode('utf-8', 'replace')).hexdigest()
    original = resolved(client, client.config.ORIG_DIR, name)
    cached = resolved(client, client.config.THUMB_DIR, thumbnail_name(name, SCALE)) if thumbnail else None
    for path, data, mark in ((original, with_exif(jpeg, make=marker), marker.encode()),
                             (cached, b'canary-thumbnail ' + marker.encode(), b'canary-thumbnail ' + marker.encode())):
        if path and path not in planted:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
            planted[path] = data, mark
    if cached in planted:                                  # newer than the original: it would be sent as is
        os.utime(cached, (os.stat(cached).st_mtime + 100,) * 2)
    return planted


def tree(root):
    """Every folder and file under root, files with their size, mtime and content hash."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.join(folder, name)] = 'folder'
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                found[path] = (os.stat(path).st_size, os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return found


def assert_untouched(answer, planted, before, after):
    """No canary read into the answer, overwritten or deleted, and no file or folder new or gone."""
    for path, (data, marker) in planted.items():
        assert marker not in answer.body, f'{path} was read'
        with open(path, 'rb') as f:
            assert f.read() == data, f'{path} was overwritten'
    assert after == before


@pytest.mark.parametrize('template', HOSTILE)
def test_hostile_store_name_is_400_and_touches_no_file(deep_client, jpeg, tmp_path, template):
    client, name = deep_client, template.replace('{parent}', str(tmp_path))
    planted = plant_canaries(client, name, jpeg, thumbnail=True)
    before, stored = tree(tmp_path), client.all_files()
    answer = client.upload(name, jpeg, status='*')
    assert_untouched(answer, planted, before, tree(tmp_path))
    assert client.all_files() == stored
    assert (answer.status_int, answer.content_type) == (400, 'text/plain') and 'store' in answer.text


ENDPOINTS = {'fileget O': ('GET', '/fileget', 'O'), 'fileget T': ('GET', '/fileget', 'T'),
             'getmetadata': ('GET', '/getmetadata', 'O'), 'getfileref T': ('GET', '/getfileref', 'T'),
             'filedelete': ('POST', '/filedelete', None)}


@pytest.mark.parametrize('template', HOSTILE)
@pytest.mark.parametrize('endpoint', ENDPOINTS)
def test_hostile_filename_is_400_on_every_endpoint_and_touches_no_file(deep_client, jpeg, tmp_path, template, endpoint):
    client, name = deep_client, template.replace('{parent}', str(tmp_path))
    method, path, kind = ENDPOINTS[endpoint]
    planted = plant_canaries(client, name, jpeg, thumbnail=endpoint in ('fileget T', 'filedelete'))
    before, stored = tree(tmp_path), client.all_files()
    params = {'filename': name, 'coll': 'Fish', 'token': client.token(name), 'scale': str(SCALE), 'dt': 'json'}
    if kind:
        params['type'] = kind
    if method == 'POST':
        answer = client.web.post(path, params, expect_errors=True)
    else:
        answer = client.web.get(path, params, expect_errors=True)
    assert_untouched(answer, planted, before, tree(tmp_path))
    assert client.all_files() == stored
    assert answer.status_int == 400 and 'filename' in answer.text


def test_percent_encoded_nul_in_a_query_is_400(client):
    assert client.web.get('/fileget?filename=a%00.jpg&type=O', status=400).status_int == 400


@pytest.mark.parametrize('name', FRIENDLY)
def test_any_single_component_name_works_end_to_end(client, jpeg, name):
    assert client.upload(name, jpeg).text == 'Ok.'
    assert client.fileget(name).body == jpeg
    fits = len(name.encode()) < 250        # longer names leave no room for _<scale> in a cache name
    client.fileget(name, 'T', scale='64', status=200 if fits else 404)
    assert client.delete(name).text == 'Ok.'
    assert client.all_files() == set()


def test_a_name_of_exactly_255_utf8_bytes_is_accepted_and_256_refused(client, jpeg):
    client.upload('é' * 127 + 'x', jpeg)
    client.upload('é' * 128, jpeg, status=400)


def test_thumbnail_of_a_name_too_long_for_its_cache_name_is_404(client, jpeg):
    client.upload('x' * 254 + '.', jpeg)
    answer = client.fileget('x' * 254 + '.', 'T', scale='123', status=404)
    assert 'too long' in answer.text
    assert client.all_files() == {'originals/' + 'x' * 254 + '.'}


def test_invalid_utf8_in_a_query_is_400_not_500(client):
    client.web.get('/fileget?filename=%ff%fe.jpg&type=O', status=400)


@pytest.mark.parametrize('coll', ['../outside', '..', 'Fish/../../x', ''])
def test_hostile_collection_is_unknown_when_collections_map_to_folders(make_client, jpeg, tmp_path, coll):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    before = tree(tmp_path)
    answer = client.upload('a.jpg', jpeg, coll=coll, status='*')
    after = tree(tmp_path)
    with open(after.pop(client.config.AUDIT_LOG) and client.config.AUDIT_LOG, encoding='ascii') as log:
        assert [json.loads(line)['outcome'] for line in log] == ['404 unknown collection']     # the refusal, audited
    assert after == before and client.all_files() == set()
    assert answer.status_int == 404
