"""Object storage beyond the shared protocol suite: several servers on one bucket, a store that
goes away, moving an attachments folder in and out, and memory on a large upload."""

import hashlib
import io
import itertools
import os
import secrets
import struct
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import boto3
import pytest
from botocore.response import StreamingBody

import migrate
import server
from harness.client import Client, KEY
from harness.images import _ifd, image_info
from harness.processes import PROJECT, wait_for
from harness.seaweed import SeaweedFS
from harness.servers import RunningServer
from config import load_config
from tokens import make_token


def s3_client(tmp_path, store, prefix, **overrides):
    settings = {'BASE_DIR': str(tmp_path / f'local-{secrets.token_hex(3)}'), 'KEY': KEY, 'ACCESS_LOG': False,
                'PREGENERATE_SCALE': None, **store.settings(prefix), **overrides}
    return Client(load_config(settings, environ={}))


def test_two_servers_on_one_bucket_act_as_one(tmp_path, seaweed, jpeg):
    prefix = 'shared-' + secrets.token_hex(4)
    first, second = s3_client(tmp_path, seaweed, prefix), s3_client(tmp_path, seaweed, prefix)
    first.upload('a.jpg', jpeg)
    assert second.fileget('a.jpg').body == jpeg
    thumbnail = second.fileget('a.jpg', 'T', scale='123').body
    assert first.fileget('a.jpg', 'T', scale='123').body == thumbnail
    assert second.delete('a.jpg').text == 'Ok.'
    first.fileget('a.jpg', status=404)
    assert first.all_files() == set()


def test_a_reupload_on_one_server_refreshes_thumbnails_on_the_other(tmp_path, seaweed, jpeg, png):
    prefix = 'shared-' + secrets.token_hex(4)
    first, second = s3_client(tmp_path, seaweed, prefix), s3_client(tmp_path, seaweed, prefix)
    first.upload('a.jpg', jpeg)
    assert image_info(second.fileget('a.jpg', 'T', scale='123').body, tmp_path)[1:] == (123, 82)
    first.upload('a.jpg', png)
    assert image_info(second.fileget('a.jpg', 'T', scale='123').body, tmp_path)[1:] == (80, 60)


@pytest.fixture
def own_seaweed(tmp_path):
    """A SeaweedFS of this test's own, which it may stop and start again."""
    (tmp_path / 'seaweed-own').mkdir()
    store = SeaweedFS(tmp_path / 'seaweed-own')
    yield store
    store.stop()


def test_a_store_that_goes_away_answers_503_quickly_never_falls_back_to_disk_and_recovers(tmp_path, own_seaweed, jpeg):
    client = s3_client(tmp_path, own_seaweed, 'down', S3_CONNECT_TIMEOUT=1, S3_READ_TIMEOUT=2)
    client.upload('a.jpg', jpeg)
    own_seaweed.stop()
    for request in (lambda: client.fileget('a.jpg', status=503),
                    lambda: client.fileget('a.jpg', 'T', scale='64', status=503),
                    lambda: client.upload('b.jpg', jpeg, status=503),
                    lambda: client.delete('a.jpg', status=503),
                    lambda: client.get('/getmetadata', {'filename': 'a.jpg'}, status=503)):
        started = time.time()
        answer = request()
        assert time.time() - started < 10
        assert answer.content_type == 'text/plain' and 'unavailable' in answer.text
        assert 'X-Timestamp' in answer.headers and answer.headers['Retry-After'] == str(server.RETRY_AFTER)
    assert client.leftovers() == []
    assert [name for _, _, files in os.walk(client.base) for name in files     # no silent fall-back to disk
            if name not in ('.web-asset-server.key', 'audit.jsonl')] == []       # the server's own files
    own_seaweed.start()
    assert client.fileget('a.jpg').body == jpeg
    assert client.upload('b.jpg', jpeg).text == 'Ok.'


# --- A file replaced while it is read ----------------------------------------------------------

class ReplacingStore:
    """The real boto3 client, except that after each `method` call on `key` (at most `times`) the
    object is replaced by the next of `versions` (bytes, metadata), as another server's upload would."""

    def __init__(self, client, method, key, versions, times):
        self.client, self.method, self.key, self.versions, self.times = client, method, key, versions, times

    def __getattr__(self, name):
        real = getattr(self.client, name)
        if name != self.method:
            return real

        def replacing(**request):
            answer = real(**request)
            if request['Key'] == self.key and self.times:
                self.times -= 1
                if 'Body' in answer:        # what this GET returned is read before the object changes
                    data = answer['Body'].read()
                    answer['Body'] = StreamingBody(io.BytesIO(data), len(data))
                body, metadata = next(self.versions)
                self.client.put_object(Bucket=request['Bucket'], Key=self.key, Body=body, Metadata=metadata)
            return answer
        return replacing


def replace_while_read(client, relative, method, versions, times):
    """Make the server's store replace the object at `relative` after `method` calls on it."""
    storage = client.app.storage
    storage.client = ReplacingStore(storage.client, method, f'{storage.prefix}/{relative}', versions, times)


def etag_of(data):
    return '"%s"' % hashlib.md5(data).hexdigest()


@pytest.mark.parametrize('method', ['head_object', 'get_object'])
def test_an_original_replaced_while_it_is_sent_is_sent_whole_as_one_version(tmp_path, seaweed, jpeg, png, method):
    client = s3_client(tmp_path, seaweed, 'swap-' + secrets.token_hex(4))
    client.upload('a.jpg', jpeg)
    replace_while_read(client, 'originals/a.jpg', method, itertools.cycle([(png, {}), (jpeg, {})]), times=2)
    answer = client.fileget('a.jpg')           # GET /fileget?filename=a.jpg&type=O&coll=Fish
    assert answer.body in (jpeg, png)
    assert (answer.headers['ETag'], answer.content_length) == (etag_of(answer.body), len(answer.body))


@pytest.mark.parametrize('method', ['head_object', 'get_object'])
def test_a_thumbnail_replaced_while_it_is_sent_is_sent_whole_as_one_version(tmp_path, seaweed, jpeg, method):
    client = s3_client(tmp_path, seaweed, 'swap-thumb-' + secrets.token_hex(4))
    client.upload('a.jpg', jpeg)
    made = client.fileget('a.jpg', 'T', scale='64').body
    fresh = {'source-etag': etag_of(jpeg)}
    other = made + b'another thumbnail of the same original'
    replace_while_read(client, 'thumbnails/a_64.jpg', method,
                       itertools.cycle([(other, fresh), (made, fresh)]), times=2)
    answer = client.fileget('a.jpg', 'T', scale='64')      # GET /fileget?filename=a.jpg&type=T&scale=64
    assert answer.body in (made, other)
    assert (answer.headers['ETag'], answer.content_length) == (etag_of(answer.body), len(answer.body))


def test_a_range_of_a_file_replaced_after_it_was_checked_comes_whole_from_the_new_version(tmp_path, seaweed, jpeg, png):
    client = s3_client(tmp_path, seaweed, 'swap-range-' + secrets.token_hex(4))
    client.upload('a.jpg', jpeg)
    replace_while_read(client, 'originals/a.jpg', 'head_object', iter([(png, {})]), times=1)
    answer = client.fileget('a.jpg', headers={'Range': 'bytes=0-9'}, status=206)
    assert (answer.body, answer.headers['ETag'], answer.headers['Content-Range']) == \
        (png[:10], etag_of(png), f'bytes 0-9/{len(png)}')


def test_a_file_that_keeps_changing_while_a_range_of_it_is_read_answers_503(tmp_path, seaweed, jpeg, png):
    client = s3_client(tmp_path, seaweed, 'swap-always-' + secrets.token_hex(4))
    client.upload('a.jpg', jpeg)
    replace_while_read(client, 'originals/a.jpg', 'head_object',
                       itertools.cycle([(png, {}), (jpeg, {})]), times=10)
    answer = client.fileget('a.jpg', headers={'Range': 'bytes=0-9'}, status=503)
    assert answer.content_type == 'text/plain' and 'changed while it was read' in answer.text


def tiff_with_date_far_in(date, at):
    """A TIFF whose only directory (with an Exif DateTimeOriginal) starts `at` bytes in."""
    first = _ifd([(0x8769, 4, 0)], at)
    exif_at = at + len(first)
    return b'II*\0' + struct.pack('<I', at) + bytes(at - 8) + _ifd([(0x8769, 4, exif_at)], at) \
        + _ifd([(0x9003, 2, date)], exif_at)


def test_metadata_of_a_file_replaced_while_its_exif_is_read_answers_503_not_a_mix(tmp_path, seaweed):
    client = s3_client(tmp_path, seaweed, 'swap-exif-' + secrets.token_hex(4))
    photo = tiff_with_date_far_in('2001:02:03 04:05:06', 200_000)          # past the first 64 KiB read
    client.upload('scan.tif', photo)
    assert client.get('/getmetadata', {'filename': 'scan.tif', 'coll': 'Fish', 'dt': 'date'}).text == '2001:02:03 04:05:06'
    replace_while_read(client, 'originals/scan.tif', 'get_object', iter([(bytes(len(photo)), {})]), times=1)
    answer = client.get('/getmetadata', {'filename': 'scan.tif', 'coll': 'Fish', 'dt': 'date'}, status=503)
    assert 'changed while it was read' in answer.text


# --- Moving an institution in and out ---------------------------------------------------------

def run_migrate(store, prefix, *args, env=None):
    environment = dict(os.environ, **{k: str(v) for k, v in store.settings(prefix).items()}, **(env or {}))
    return subprocess.run([sys.executable, 'migrate.py', *args], cwd=PROJECT, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def upstream_folder(tmp_path, jpeg, png):
    """An existing attachments folder with collection folders and one without."""
    folder = tmp_path / 'existing'
    files = {'fish/originals/a.jpg': jpeg, 'fish/thumbnails/a_123.jpg': png,
             'plants/originals/sheet.png': png, 'originals/loose.jpg': jpeg,
             'fish/originals/big.bin': os.urandom(17 * 1024 * 1024)}     # multipart-sized
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    (folder / '.web-asset-server.key').write_text('not an attachment')
    return folder, files


def test_migration_copies_a_folder_with_collection_folders_into_the_bucket(seaweed, upstream_folder, tmp_path):
    folder, files = upstream_folder
    prefix = 'migrated-' + secrets.token_hex(4)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert done.returncode == 0, done.stderr
    assert 'copied 5, already there 0, failed 0' in done.stdout
    client = s3_client(tmp_path, seaweed, prefix, COLLECTION_DIRS={'Fish': 'fish', 'Plants': 'plants'})
    assert client.all_files() == set(files)
    assert client.fileget('a.jpg', coll='Fish').body == files['fish/originals/a.jpg']
    assert client.fileget('sheet.png', coll='Plants').content_type == 'image/png'
    assert client.fileget('big.bin', coll='Fish').body == files['fish/originals/big.bin']


def test_migration_resumes_and_skips_what_is_already_there(seaweed, upstream_folder):
    folder, _files = upstream_folder
    prefix = 'resumed-' + secrets.token_hex(4)
    store = seaweed.client()
    store.put_object(Bucket=seaweed.bucket, Key=f'{prefix}/originals/loose.jpg',
                     Body=(folder / 'originals/loose.jpg').read_bytes())
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert 'copied 4, already there 1, failed 0' in done.stdout
    again = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert 'copied 0, already there 5, failed 0' in again.stdout


def test_migration_dry_run_copies_nothing(seaweed, upstream_folder):
    folder, _files = upstream_folder
    prefix = 'dry-' + secrets.token_hex(4)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder), '--dry-run')
    assert 'would copy 5' in done.stdout
    assert 'Contents' not in seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)


def test_migration_back_from_the_bucket_rebuilds_the_folder(seaweed, upstream_folder, tmp_path):
    folder, files = upstream_folder
    prefix = 'roundtrip-' + secrets.token_hex(4)
    run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    back = tmp_path / 'back'
    done = run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back))
    assert 'copied 5, already there 0, failed 0' in done.stdout, done.stderr
    assert {str(p.relative_to(back)): p.read_bytes() for p in back.rglob('*') if p.is_file()} == files


def test_migration_carries_the_checksums_into_the_bucket_and_back(seaweed, tmp_path):
    folder = tmp_path / 'with-checksums'
    on_disk = Client(load_config({'BASE_DIR': str(folder), 'KEY': KEY, 'ACCESS_LOG': False, 'PREGENERATE_SCALE': None},
                                 environ={}))
    on_disk.upload('a.jpg', b'photo bytes')
    digest = hashlib.sha256(b'photo bytes').hexdigest()
    prefix = 'checksums-' + secrets.token_hex(4)
    assert run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder)).returncode == 0
    in_bucket = s3_client(tmp_path, seaweed, prefix)
    assert in_bucket.app.storage.checksum(None, 'a.jpg') == on_disk.app.storage.checksum(None, 'a.jpg')
    assert in_bucket.app.storage.names_with_sha256(None, digest) == ['a.jpg']
    back = tmp_path / 'back'
    assert run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back)).returncode == 0
    again = Client(load_config({'BASE_DIR': str(back), 'KEY': KEY, 'ACCESS_LOG': False, 'PREGENERATE_SCALE': None},
                               environ={}))
    assert again.app.storage.checksum(None, 'a.jpg') == on_disk.app.storage.checksum(None, 'a.jpg')
    assert again.app.storage.names_with_sha256(None, digest) == ['a.jpg']
    assert again.all_files() == {'originals/a.jpg'}


def altered(data):
    """The same number of bytes with one of them changed, as a corrupted copy would be."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def test_migration_with_overwrite_recopies_an_object_of_the_same_size_with_other_bytes(seaweed, upstream_folder):
    folder, files = upstream_folder
    prefix = 'same-size-' + secrets.token_hex(4)
    store = seaweed.client()
    store.put_object(Bucket=seaweed.bucket, Key=f'{prefix}/fish/originals/a.jpg',
                     Body=altered(files['fish/originals/a.jpg']))
    store.put_object(Bucket=seaweed.bucket, Key=f'{prefix}/originals/loose.jpg', Body=files['originals/loose.jpg'])
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder), '--overwrite')
    assert 'copied 4, already there 1, failed 0, conflicts 0' in done.stdout, done.stderr
    copied = store.get_object(Bucket=seaweed.bucket, Key=f'{prefix}/fish/originals/a.jpg')['Body'].read()
    assert copied == files['fish/originals/a.jpg']


def test_migration_into_the_bucket_leaves_an_object_with_other_bytes_as_it_is_and_reports_a_conflict(
        seaweed, upstream_folder):
    folder, files = upstream_folder
    prefix = 'conflict-' + secrets.token_hex(4)
    store = seaweed.client()
    newer = altered(files['fish/originals/a.jpg'])         # written by the server after the switch
    store.put_object(Bucket=seaweed.bucket, Key=f'{prefix}/fish/originals/a.jpg', Body=newer)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert done.returncode == 1
    assert 'copied 3, already there 0, failed 0, conflicts 1' in done.stdout, done.stderr
    assert f'conflict: {prefix}/fish/originals/a.jpg' in done.stderr
    assert store.get_object(Bucket=seaweed.bucket, Key=f'{prefix}/fish/originals/a.jpg')['Body'].read() == newer


def attachments_folder(folder, files):
    """Write `files` ({relative path: bytes}) into `folder`, each after the one before."""
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


def test_migration_into_the_bucket_leaves_out_a_thumbnail_older_than_its_original(seaweed, tmp_path, jpeg, png):
    folder = attachments_folder(tmp_path / 'existing', {'originals/a.jpg': jpeg, 'thumbnails/a_123.jpg': png})
    made = os.stat(folder / 'originals/a.jpg').st_mtime
    os.utime(folder / 'thumbnails/a_123.jpg', (made - 60, made - 60))       # made from an older a.jpg
    prefix = 'stale-' + secrets.token_hex(4)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert 'copied 1, already there 0, failed 0, conflicts 0, skipped 0, thumbnails left out 1' in done.stdout
    client = s3_client(tmp_path, seaweed, prefix)
    thumbnail = client.fileget('a.jpg', 'T', scale='123').body      # GET /fileget?filename=a.jpg&type=T&scale=123
    assert image_info(thumbnail, tmp_path)[1:] == (123, 82)


def test_migration_into_the_bucket_records_the_original_a_fresh_thumbnail_was_made_from(seaweed, tmp_path, jpeg, png):
    folder = attachments_folder(tmp_path / 'existing', {'originals/a.jpg': jpeg, 'thumbnails/a_123.jpg': png})
    prefix = 'fresh-' + secrets.token_hex(4)
    run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    store = seaweed.client()
    thumbnail = store.head_object(Bucket=seaweed.bucket, Key=f'{prefix}/thumbnails/a_123.jpg')
    assert thumbnail['Metadata'] == {'source-etag': etag_of(jpeg)}


def test_migration_into_the_bucket_skips_a_file_whose_name_is_not_utf8_and_names_it(seaweed, tmp_path, jpeg):
    folder = attachments_folder(tmp_path / 'existing', {'originals/a.jpg': jpeg})
    with open(os.path.join(os.fsencode(folder), b'originals', b'caf\xe9.jpg'), 'wb') as f:
        f.write(jpeg)
    prefix = 'latin1-' + secrets.token_hex(4)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert done.returncode == 0, done.stderr
    assert 'copied 1, already there 0, failed 0, conflicts 0, skipped 1' in done.stdout
    assert "skipped originals/caf\\xe9.jpg: its name is not UTF-8" in done.stderr
    assert 'Traceback' not in done.stderr


def test_migration_into_the_bucket_follows_no_symbolic_link_and_names_it(seaweed, tmp_path, jpeg):
    folder = attachments_folder(tmp_path / 'existing', {'originals/a.jpg': jpeg})
    (tmp_path / 'outside.txt').write_text('not an attachment of this folder')
    os.symlink(tmp_path / 'outside.txt', folder / 'originals' / 'hostname.jpg')
    prefix = 'symlink-' + secrets.token_hex(4)
    done = run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    assert 'copied 1, already there 0, failed 0, conflicts 0, skipped 1' in done.stdout, done.stderr
    assert 'skipped originals/hostname.jpg: it is a symbolic link (not followed)' in done.stderr
    listing = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix + '/')
    assert [item['Key'] for item in listing['Contents']] == [f'{prefix}/originals/a.jpg']


def test_a_file_to_copy_is_opened_without_following_a_symbolic_link(tmp_path):
    (tmp_path / 'outside.txt').write_text('not an attachment')
    os.symlink(tmp_path / 'outside.txt', tmp_path / 'a.jpg')      # as if swapped in after the walk
    with pytest.raises(migrate.NotAFile, match='symbolic link'):
        migrate.open_regular(str(tmp_path / 'a.jpg'))


def test_a_fifo_to_copy_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = str(tmp_path / 'a.jpg')
    os.mkfifo(fifo)
    refused = []

    def open_it():
        with pytest.raises(migrate.NotAFile, match='not a regular file'):
            migrate.open_regular(fifo)
        refused.append(True)
    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(10)
    if opener.is_alive():               # it waits for a writer: be one, so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert refused == [True]


def disk_client(tmp_path, folder):
    return Client(load_config({'BASE_DIR': str(folder), 'KEY': KEY, 'ACCESS_LOG': False,
                                      'PREGENERATE_SCALE': None, 'STORAGE': 'disk'}, environ={}))


def test_migration_back_leaves_out_a_thumbnail_that_was_stale_in_the_bucket(seaweed, tmp_path, jpeg, png):
    prefix = 'stale-back-' + secrets.token_hex(4)
    s3_client(tmp_path, seaweed, prefix).upload('a.jpg', jpeg)
    seaweed.client().put_object(Bucket=seaweed.bucket, Key=f'{prefix}/thumbnails/a_123.jpg', Body=png,
                                Metadata={'source-etag': etag_of(b'an older a.jpg')})
    back = tmp_path / 'back'
    done = run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back))
    assert 'copied 1, already there 0, failed 0, conflicts 0, skipped 0, thumbnails left out 1' in done.stdout
    thumbnail = disk_client(tmp_path, back).fileget('a.jpg', 'T', scale='123').body
    assert image_info(thumbnail, tmp_path)[1:] == (123, 82)


def test_migration_back_gives_an_original_its_objects_last_modified_time(seaweed, tmp_path, jpeg):
    prefix = 'mtime-back-' + secrets.token_hex(4)
    s3_client(tmp_path, seaweed, prefix).upload('a.jpg', jpeg)
    modified = seaweed.client().head_object(Bucket=seaweed.bucket, Key=f'{prefix}/originals/a.jpg')['LastModified']
    back = tmp_path / 'back'
    run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back))
    assert os.stat(back / 'originals' / 'a.jpg').st_mtime_ns == int(modified.timestamp()) * 10**9 + modified.microsecond * 1000


def test_migration_back_keeps_a_thumbnail_fresh_that_was_made_from_the_same_bytes_before_the_original_was_stored_again(
        seaweed, tmp_path, jpeg, png):
    prefix = 'fresh-back-' + secrets.token_hex(4)
    store = seaweed.client()
    thumbnail_key, original_key = f'{prefix}/thumbnails/a_123.jpg', f'{prefix}/originals/a.jpg'
    store.put_object(Bucket=seaweed.bucket, Key=original_key, Body=jpeg)
    store.put_object(Bucket=seaweed.bucket, Key=thumbnail_key, Body=png, Metadata={'source-etag': etag_of(jpeg)})
    made = store.head_object(Bucket=seaweed.bucket, Key=thumbnail_key)['LastModified']

    def stored_again_later():
        store.put_object(Bucket=seaweed.bucket, Key=original_key, Body=jpeg)      # same bytes, so the same ETag
        return store.head_object(Bucket=seaweed.bucket, Key=original_key)['LastModified'] > made
    assert wait_for(stored_again_later)
    back = tmp_path / 'back'
    run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back))
    assert disk_client(tmp_path, back).fileget('a.jpg', 'T', scale='123').body == png


def test_migration_back_recopies_a_file_of_the_same_size_with_other_bytes(seaweed, upstream_folder, tmp_path):
    folder, files = upstream_folder
    prefix = 'same-size-back-' + secrets.token_hex(4)
    run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    back = tmp_path / 'back'
    for relative, data in files.items():
        (back / relative).parent.mkdir(parents=True, exist_ok=True)
        (back / relative).write_bytes(altered(data) if relative == 'fish/originals/a.jpg' else data)
    done = run_migrate(seaweed, prefix, 'from-s3', '--folder', str(back))
    assert 'copied 1, already there 4, failed 0' in done.stdout, done.stderr
    assert (back / 'fish/originals/a.jpg').read_bytes() == files['fish/originals/a.jpg']


class CorruptingStore:
    """The real boto3 client, except that transfers of keys ending in `damaged` change one byte."""

    def __init__(self, client, damaged, scratch):
        self.client, self.damaged, self.scratch = client, damaged, scratch

    def __getattr__(self, name):
        return getattr(self.client, name)

    def upload_fileobj(self, source, bucket, key, **options):
        if key.endswith(self.damaged):
            source = io.BytesIO(altered(source.read()))
        return self.client.upload_fileobj(source, bucket, key, **options)

    def download_file(self, bucket, key, path, **options):
        self.client.download_file(bucket, key, path, **options)
        if key.endswith(self.damaged):
            with open(path, 'rb') as f:
                data = f.read()
            with open(path, 'wb') as f:
                f.write(altered(data))


def corrupting(monkeypatch, damaged, scratch):
    """Make migrate's boto3 client damage the transfers of one key."""
    real = migrate.make_client
    monkeypatch.setattr(migrate, 'make_client', lambda config: CorruptingStore(real(config), damaged, scratch))


@pytest.mark.parametrize('damaged, copied, left_out', [('fish/originals/a.jpg', 3, 1),     # one part: and its thumbnail
                                                        ('fish/originals/big.bin', 4, 0)])  # multipart
def test_migration_reports_a_copy_whose_bytes_the_store_got_wrong(seaweed, upstream_folder, tmp_path,
                                                                    monkeypatch, capsys, damaged, copied, left_out):
    folder, _files = upstream_folder
    prefix = 'corrupted-' + secrets.token_hex(4)
    config = load_config(seaweed.settings(prefix), environ={})
    corrupting(monkeypatch, damaged, tmp_path)
    assert migrate.to_s3(config, str(folder), dry_run=False) == {
        'copied': copied, 'already there': 0, 'failed': 1, 'conflicts': 0, 'skipped': 0, 'thumbnails left out': left_out}
    assert f'verification failed: {prefix}/{damaged}' in capsys.readouterr().err


def test_migration_back_keeps_no_file_whose_downloaded_bytes_are_wrong(seaweed, upstream_folder, tmp_path,
                                                                      monkeypatch, capsys):
    folder, _files = upstream_folder
    prefix = 'corrupted-back-' + secrets.token_hex(4)
    run_migrate(seaweed, prefix, 'to-s3', '--folder', str(folder))
    config = load_config(seaweed.settings(prefix), environ={})
    corrupting(monkeypatch, 'fish/originals/a.jpg', tmp_path)
    back = tmp_path / 'back'
    assert migrate.from_s3(config, str(back), dry_run=False) == {     # a.jpg's thumbnail without its original too
        'copied': 3, 'already there': 0, 'failed': 1, 'conflicts': 0, 'skipped': 0, 'thumbnails left out': 1}
    assert f'verification failed: {prefix}/fish/originals/a.jpg' in capsys.readouterr().err
    assert sorted(os.listdir(back / 'fish' / 'originals')) == ['big.bin']


# --- Memory ------------------------------------------------------------------------------

def resident_memory(pid):
    with open(f'/proc/{pid}/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS:'))


def test_a_1_gb_upload_to_s3_keeps_the_server_under_150_mb(tmp_path, seaweed):
    web = RunningServer(tmp_path / 'local', tmp_path / 'server.log', ACCESS_LOG='false',
                        **{k: str(v) for k, v in seaweed.settings('big-' + secrets.token_hex(4)).items()})
    try:
        size, boundary = 1024 ** 3, 'bigboundary'
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="scan.tif"\r\n\r\n').encode()
        tail = ''.join(f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'
                       for k, v in [('store', 'scan.tif'), ('type', 'O'),
                                    ('token', make_token(KEY, 'scan.tif'))]) + f'\r\n--{boundary}--\r\n'
        block = os.urandom(1024 * 1024)

        def body():
            yield head
            for _ in range(size // len(block)):
                yield block
            yield tail.encode()
        peak = [0]
        sampling = [True]

        def sample():
            while sampling[0]:
                peak[0] = max(peak[0], resident_memory(web.process.pid))
                time.sleep(0.05)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            status, _, answer = web.request('POST', '/fileupload', body(), {
                'Content-Type': f'multipart/form-data; boundary={boundary}',
                'Content-Length': str(len(head) + size + len(tail.encode()))}, timeout=600)
        finally:
            sampling[0] = False
            sampler.join()
        print(f'\n1 GiB upload to S3: peak resident memory {peak[0] / 2**20:.0f} MB')
        assert (status, answer) == (200, b'Ok.')
        assert peak[0] < 150 * 2**20
        query = urlencode({'filename': 'scan.tif', 'type': 'O'})
        status, headers, _ = web.request('HEAD', '/fileget?' + query)
        assert int(headers['Content-Length']) == size
    finally:
        web.stop()


def failing_transfers(storage):
    """Make every upload to the store fail as boto3 reports a PutObject that kept answering InternalError."""
    def fail(*_args, **_kwargs):
        raise boto3.exceptions.S3UploadFailedError('Failed to upload: An error occurred (InternalError) when calling '
                                                   'the PutObject operation (reached max retries: 2)')
    storage.client.upload_file = fail


def test_an_upload_the_store_fails_to_take_answers_503(tmp_path, seaweed, jpeg):
    client = s3_client(tmp_path, seaweed, 'put-fails')
    failing_transfers(client.app.storage)
    answer = client.upload('a.jpg', jpeg, status=503)
    assert 'unavailable' in answer.text and answer.headers['Retry-After'] == str(server.RETRY_AFTER)


def test_a_thumbnail_the_store_fails_to_take_answers_503(tmp_path, seaweed, jpeg):
    client = s3_client(tmp_path, seaweed, 'thumbnail-put-fails')
    client.upload('a.jpg', jpeg)
    failing_transfers(client.app.storage)
    answer = client.fileget('a.jpg', 'T', scale='64', status=503)
    assert answer.headers['Retry-After'] == str(server.RETRY_AFTER)

