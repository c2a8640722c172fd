"""Checksums from ingest: SHA-256 and MD5 taken as an upload streams in, kept with the original (on disk in the
catalogue beside the originals, on S3 in the object's metadata), answered as Repr-Digest (RFC 9530) on GET and
HEAD of an original, and looked up by SHA-256 for an importer holding a token."""

import base64
import hashlib
import json
import os

import pytest

from checksums import INGEST, Checksum, Hashing, checksum_from_fields, checksum_from_text
from harness.client import KEY
from tokens import make_token


def repr_digest(data):
    """The Repr-Digest RFC 9530 gives for these bytes with sha-256."""
    return 'sha-256=:' + base64.b64encode(hashlib.sha256(data).digest()).decode() + ':'


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def by_checksum(client, digest, coll='Fish', token=None, status=None):
    """GET /filesbychecksum as an importer asks it."""
    return client.get('/filesbychecksum', {'coll': coll, 'sha256': digest,
                                           'token': make_token(KEY, digest) if token is None else token}, status)


def put_behind_the_servers_back(client, relative, data):
    """Store a file as the old server or another tool left it: no checksum recorded."""
    if client.config.STORAGE == 's3':
        storage = client.app.storage
        storage.client.put_object(Bucket=storage.bucket, Key=f'{storage.prefix}/{relative}', Body=data)
        return
    os.makedirs(os.path.dirname(client.path(relative)), exist_ok=True)
    with open(client.path(relative), 'wb') as f:
        f.write(data)


# --- Repr-Digest ------------------------------------------------------------------------------------------------

def test_an_original_is_answered_with_the_sha256_of_its_bytes_as_repr_digest(client):
    data = os.urandom(70_000)
    client.upload('a.bin', data)
    answer = client.fileget('a.bin')
    assert answer.body == data
    assert answer.headers['Repr-Digest'] == repr_digest(data)


def test_a_head_of_an_original_carries_repr_digest(client):
    data = os.urandom(5000)
    client.upload('a.bin', data)
    answer = client.web.head('/fileget', {'filename': 'a.bin', 'type': 'O', 'coll': 'Fish'})
    assert answer.headers['Repr-Digest'] == repr_digest(data)


def test_a_range_of_an_original_carries_the_digest_of_the_whole_file(client):
    data = os.urandom(5000)
    client.upload('a.bin', data)
    answer = client.fileget('a.bin', headers={'Range': 'bytes=10-19'}, status=206)
    assert (answer.body, answer.headers['Repr-Digest']) == (data[10:20], repr_digest(data))


def test_a_large_original_carries_repr_digest(client):
    data = os.urandom(3 * 2**20 + 17)               # past the small files kept in memory, and S3's multipart size
    client.upload('scan.tif', data)
    assert client.fileget('scan.tif').headers['Repr-Digest'] == repr_digest(data)


def test_an_original_read_through_static_carries_repr_digest(make_client):
    client = make_client(ALLOW_STATIC_FILE_ACCESS=True)
    data = os.urandom(5000)
    client.upload('a.bin', data)
    assert client.get('/static/originals/a.bin', {}).headers['Repr-Digest'] == repr_digest(data)


def test_a_replaced_original_carries_the_digest_of_its_new_bytes(client):
    client.upload('a.bin', b'first version')
    client.upload('a.bin', b'second version')
    assert client.fileget('a.bin').headers['Repr-Digest'] == repr_digest(b'second version')


def test_a_thumbnail_carries_no_repr_digest(client, png):
    client.upload('a.png', png)
    assert 'Repr-Digest' not in client.fileget('a.png', 'T', scale='32').headers


def test_an_original_stored_without_the_server_has_no_repr_digest(client):
    put_behind_the_servers_back(client, 'originals/old.jpg', b'left by the old server')
    answer = client.fileget('old.jpg')
    assert answer.body == b'left by the old server' and 'Repr-Digest' not in answer.headers


@pytest.mark.disk_only
def test_an_original_rewritten_to_another_size_behind_the_servers_back_has_no_repr_digest(client):
    client.upload('a.bin', b'as uploaded')
    with open(client.path('originals', 'a.bin'), 'wb') as f:
        f.write(b'rewritten by something else')
    assert 'Repr-Digest' not in client.fileget('a.bin').headers


@pytest.mark.disk_only
def test_a_damaged_catalogue_entry_gives_no_repr_digest_and_no_error(client):
    client.upload('a.bin', b'data')
    with open(client.path('.checksums', 'a.bin'), 'wb') as f:
        f.write(b'{"sha256": "not hex"')
    answer = client.fileget('a.bin')
    assert answer.body == b'data' and 'Repr-Digest' not in answer.headers


@pytest.mark.disk_only
def test_an_offloaded_original_carries_repr_digest(make_client):
    client = make_client(FILE_OFFLOAD='nginx')
    client.upload('a.bin', b'data')
    answer = client.fileget('a.bin')
    assert answer.headers['X-Accel-Redirect'] and answer.headers['Repr-Digest'] == repr_digest(b'data')


# --- What is recorded -------------------------------------------------------------------------------------------

def recorded(client, name, coll='Fish'):
    return client.app.storage.checksum(coll, name)


def test_an_upload_records_sha256_md5_and_size_as_taken_at_ingest(client):
    data = os.urandom(100_000)
    client.upload('a.bin', data)
    checksum = recorded(client, 'a.bin')
    assert (checksum.sha256, checksum.md5, checksum.size, checksum.recorded) == (
        sha256(data), hashlib.md5(data).hexdigest(), len(data), INGEST)


def test_an_empty_upload_records_the_checksum_of_no_bytes(client):
    client.upload('empty.txt', b'')
    assert (recorded(client, 'empty.txt').sha256, recorded(client, 'empty.txt').size) == (sha256(b''), 0)


def test_an_upload_in_specify_6_style_records_the_checksum_of_the_file_part_alone(client):
    client.upload('a.jpg', b'photo bytes', style=6)
    assert recorded(client, 'a.jpg').sha256 == sha256(b'photo bytes')


def test_a_checksum_survives_a_new_server_on_the_same_storage(make_client):
    make_client().upload('a.bin', b'data')
    assert make_client().fileget('a.bin').headers['Repr-Digest'] == repr_digest(b'data')


@pytest.mark.disk_only
def test_on_disk_the_checksum_is_kept_in_the_catalogue_beside_the_originals(client):
    client.upload('a.bin', b'data')
    entry = json.loads(client.stored('.checksums/a.bin'))
    assert (entry['sha256'], entry['md5'], entry['size'], entry['recorded']) == (
        sha256(b'data'), hashlib.md5(b'data').hexdigest(), 4, 'ingest')


@pytest.mark.disk_only
def test_a_replaced_originals_catalogue_entry_keeps_the_checksum_it_replaced(client):
    client.upload('a.bin', b'first')
    client.upload('a.bin', b'second version')
    entry = json.loads(client.stored('.checksums/a.bin'))
    assert (entry['sha256'], entry['previous']['sha256']) == (sha256(b'second version'), sha256(b'first'))


@pytest.mark.disk_only
def test_after_a_crash_between_the_catalogue_and_the_original_the_old_bytes_keep_their_checksum(client):
    client.upload('a.bin', b'first')
    storage = client.app.storage
    storage._catalogue('Fish', 'a.bin', Hashing().checksum(), storage.checksum('Fish', 'a.bin'))   # then the crash
    assert client.fileget('a.bin').headers['Repr-Digest'] == repr_digest(b'first')


@pytest.mark.s3_only
def test_on_s3_the_checksum_is_kept_in_the_objects_own_metadata(client):
    client.upload('a.bin', b'data')
    storage = client.app.storage
    metadata = storage.client.head_object(Bucket=storage.bucket, Key=f'{storage.prefix}/originals/a.bin')['Metadata']
    assert (metadata['sha256'], metadata['md5'], metadata['checksum-recorded']) == (
        sha256(b'data'), hashlib.md5(b'data').hexdigest(), 'ingest')


def test_a_refused_upload_records_no_checksum(client):
    client.upload('a.bin', b'data', token='bad', status=403)
    client.all_files()                                  # every record names a stored original
    assert client.stored_files() == set()


def test_a_delete_removes_the_checksum_with_the_original(client):
    client.upload('a.bin', b'data')
    client.delete('a.bin')
    assert [path for path in client.stored_files() if not path.startswith('.trash/')] == []


def test_the_same_bytes_uploaded_again_under_the_same_name_are_stored_again(client):
    client.upload('a.bin', b'data')
    assert client.upload('a.bin', b'data').text == 'Ok.'
    assert client.fileget('a.bin').headers['Repr-Digest'] == repr_digest(b'data')
    assert json.loads(by_checksum(client, sha256(b'data')).text)['names'] == ['a.bin']


# --- Looked up by SHA-256 ---------------------------------------------------------------------------------------

def test_the_names_with_a_sha256_are_listed(client):
    for name, data in (('a.jpg', b'same'), ('b.jpg', b'same'), ('c.jpg', b'other')):
        client.upload(name, data)
    answer = by_checksum(client, sha256(b'same'))
    assert json.loads(answer.text) == {'sha256': sha256(b'same'), 'names': ['a.jpg', 'b.jpg']}
    assert answer.headers['Cache-Control'] == 'private, no-store'


def test_a_sha256_no_original_has_lists_no_names(client):
    client.upload('a.jpg', b'data')
    assert json.loads(by_checksum(client, sha256(b'never sent')).text)['names'] == []


def test_a_replaced_original_is_no_longer_listed_under_its_old_sha256(client):
    client.upload('a.jpg', b'first')
    client.upload('a.jpg', b'second')
    assert json.loads(by_checksum(client, sha256(b'first')).text)['names'] == []
    assert json.loads(by_checksum(client, sha256(b'second')).text)['names'] == ['a.jpg']


def test_a_deleted_original_is_no_longer_listed(client):
    client.upload('a.jpg', b'data')
    client.delete('a.jpg')
    assert json.loads(by_checksum(client, sha256(b'data')).text)['names'] == []


def test_the_lookup_lists_only_the_collection_asked(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Plants': 'plants'})
    client.upload('a.jpg', b'data', coll='Fish')
    client.upload('b.jpg', b'data', coll='Plants')
    assert json.loads(by_checksum(client, sha256(b'data'), coll='Plants').text)['names'] == ['b.jpg']


def test_the_lookup_needs_a_token_signing_the_sha256(client):
    client.upload('a.jpg', b'data')
    assert by_checksum(client, sha256(b'data'), token=make_token(KEY, 'a.jpg'), status=403).status_int == 403


def test_the_lookup_needs_a_token_even_when_reads_need_none(make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=False)
    by_checksum(client, sha256(b'data'), token='', status=403)


@pytest.mark.parametrize('digest', ['', 'abc', 'A' * 64, 'g' * 64, '0' * 63, '0' * 65, '../' + '0' * 61])
def test_a_lookup_of_something_that_is_not_a_lowercase_sha256_is_refused(client, digest):
    assert by_checksum(client, digest, status=400).text == 'Bad sha256: it must be 64 lowercase hexadecimal digits.'


def test_a_stale_index_entry_is_not_listed(client):
    client.upload('a.jpg', b'data')
    client.app.storage._index('Fish', sha256(b'other'), 'a.jpg')     # as a crash mid-replace can leave
    assert json.loads(by_checksum(client, sha256(b'other')).text)['names'] == []


def test_capabilities_name_the_checksums_and_the_lookup(client):
    checksums = json.loads(client.get('/capabilities.json', {}).text)['checksums']
    assert checksums == {'algorithms': ['sha-256', 'md5'], 'reprDigest': 'sha-256',
                         'lookup': 'http://assets.example.org:8080/filesbychecksum'}


# --- The checksum itself ----------------------------------------------------------------------------------------

def test_hashing_in_pieces_gives_the_digests_of_the_whole():
    data = os.urandom(10_000)
    hashing = Hashing()
    for start in range(0, len(data), 777):
        hashing.update(data[start:start + 777])
    checksum = hashing.checksum()
    assert (checksum.sha256, checksum.md5, checksum.size) == (sha256(data), hashlib.md5(data).hexdigest(), 10_000)


def test_a_catalogue_entry_reads_back_as_the_checksum_it_holds():
    checksum = Checksum(sha256(b'x'), hashlib.md5(b'x').hexdigest(), 1, 'later', 1000.5)
    assert checksum_from_text(checksum.as_text()) == checksum


@pytest.mark.parametrize('change', [{'sha256': 'A' * 64}, {'md5': 'x'}, {'size': -1}, {'recorded': 'guessed'},
                                    {'at': 'yesterday'}, {'sha256': None}])
def test_fields_that_are_not_a_checksum_read_as_none(change):
    fields = {'sha256': sha256(b'x'), 'md5': hashlib.md5(b'x').hexdigest(), 'size': 1, 'recorded': 'ingest',
              'at': 1.0}
    assert checksum_from_fields(fields) is not None
    assert checksum_from_fields({**fields, **change}) is None
