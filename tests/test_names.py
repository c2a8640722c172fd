"""Names are checked before any file system call: nothing outside BASE_DIR, clear 400s."""

import os

import pytest

HOSTILE = ['../escape.jpg', '../../etc/passwd', 'a/b.jpg', '/abs.jpg', '..', '.', 'a\\b.jpg',
           '..\\..\\win.jpg', 'nul\0byte.jpg', '', 'é' * 128, '.~wast-0123.part']
FRIENDLY = ['Käfer 🐞 (1).jpg', 'name with spaces.JPG', '-rf', ' leading space', 'a%2Fb.jpg',
            '...', '.hidden', 'x' * 255, 'é' * 127 + '.', "quote'\"<>|?*.jpg", '[0].jpg', '%d%s.jpg']


def outside_files(tmp_path):
    """Files anywhere under tmp_path but outside the attachments folder."""
    found = set()
    for folder, _dirs, files in os.walk(tmp_path):
        if not folder.startswith(str(tmp_path / 'attachments')):
            found.update(os.path.join(folder, name) for name in files)
    return found


@pytest.mark.parametrize('name', HOSTILE)
def test_hostile_store_name_is_400_and_writes_nothing(client, jpeg, tmp_path, name):
    before = outside_files(tmp_path)
    answer = client.upload(name, jpeg, status=400)
    assert answer.content_type == 'text/plain' and 'store' in answer.text
    assert client.all_files() == set()
    assert outside_files(tmp_path) == before


@pytest.mark.parametrize('name', HOSTILE)
@pytest.mark.parametrize('endpoint', ['fileget O', 'fileget T', 'getmetadata', 'getfileref', 'filedelete'])
def test_hostile_filename_is_400_on_every_endpoint(client, tmp_path, name, endpoint):
    (tmp_path / 'escape.jpg').write_bytes(b'outside')
    params = {'filename': name, 'coll': 'Fish', 'token': client.token(name), 'scale': '123'}
    if endpoint == 'filedelete':
        answer = client.web.post('/filedelete', params, status=400)
    else:
        path, _, kind = endpoint.partition(' ')
        answer = client.get('/' + path, dict(params, type=kind or 'O'), status=400)
    assert 'filename' in answer.text
    assert (tmp_path / 'escape.jpg').read_bytes() == b'outside'


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
    client.upload('a.jpg', jpeg, coll=coll, status=404)
    assert client.all_files() == set()
    assert outside_files(tmp_path) == set()
