"""The trash: /filedelete moves an original into a trash kept TRASH_DAYS days (0: deleted at once); to every client
the file is gone as before; it can be restored with its checksum until it is purged, in the background, past
retention."""

import base64
import hashlib
import json
import os
import time

import pytest

from config import ConfigError, load_config
from harness.client import KEY, Client
from harness.processes import wait_for
from harness.servers import RunningServer
from tokens import make_token


def repr_digest(data):
    return 'sha-256=:' + base64.b64encode(hashlib.sha256(data).digest()).decode() + ':'


def audit_lines(client):
    with open(client.config.AUDIT_LOG, encoding='ascii') as log:
        return [json.loads(line) for line in log]


def only_entry(client, coll='Fish'):
    [entry] = client.app.storage.trashed(None if client.config.COLLECTION_DIRS is None else coll)
    return entry


# --- Deleting -----------------------------------------------------------------------------------------------

def test_a_deleted_original_is_gone_to_clients_and_kept_in_the_trash(client):
    client.upload('a.jpg', b'photo')
    assert client.delete('a.jpg').text == 'Ok.'
    client.fileget('a.jpg', status=404)
    assert client.all_files() == set() and client.trash_entries() == ['a.jpg']
    assert list(client.app.storage.originals(None)) == []


def test_a_trash_entry_keeps_the_size_and_the_checksum_recorded_at_ingest(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    entry = only_entry(client)
    assert (entry.name, entry.size, entry.checksum.sha256, entry.checksum.recorded) == (
        'a.jpg', 5, hashlib.sha256(b'photo').hexdigest(), 'ingest')


def test_a_deleted_originals_thumbnails_are_dropped(client, png):
    client.upload('a.png', png)
    client.fileget('a.png', 'T', scale='32')
    client.delete('a.png')
    assert client.all_files() == set()


def test_a_deleted_original_is_no_longer_found_by_its_checksum(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    digest = hashlib.sha256(b'photo').hexdigest()
    answer = client.get('/filesbychecksum', {'sha256': digest, 'token': make_token(KEY, digest)})
    assert json.loads(answer.text)['names'] == []


def test_with_trash_days_0_a_delete_removes_the_original_at_once(make_client):
    client = make_client(TRASH_DAYS=0)
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    assert client.stored_files() == set() and client.trash_entries() == []


def test_the_trash_cannot_be_read_through_static(make_client):
    client = make_client(ALLOW_STATIC_FILE_ACCESS=True)
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    entry = only_entry(client)
    client.get(f'/static/.trash/{entry.id}', {}, status=404)
    client.get(f'/static/.trash/{entry.id}.json', {}, status=404)


def test_uploading_the_name_again_stores_the_new_file_and_keeps_the_trashed_one(client):
    client.upload('a.jpg', b'old')
    client.delete('a.jpg')
    client.upload('a.jpg', b'new')
    assert client.fileget('a.jpg').body == b'new'
    assert only_entry(client).checksum.sha256 == hashlib.sha256(b'old').hexdigest()


def test_each_delete_of_a_name_is_an_entry_of_its_own(client):
    for data in (b'first', b'second'):
        client.upload('a.jpg', data)
        client.delete('a.jpg')
    entries = list(client.app.storage.trashed(None))
    assert [entry.size for entry in entries] == [5, 6] and entries[0].id != entries[1].id
    assert entries[0].deleted < entries[1].deleted


def test_the_audit_log_names_the_trash_entry_of_a_delete(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    assert audit_lines(client)[-1]['trash'] == only_entry(client).id


def test_the_trash_of_one_collection_is_its_own(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Plants': 'plants'})
    client.upload('a.jpg', b'fish', coll='Fish')
    client.upload('a.jpg', b'plant', coll='Plants')
    client.delete('a.jpg', coll='Plants')
    assert [e.size for e in client.app.storage.trashed('Plants')] == [5]
    assert list(client.app.storage.trashed('Fish')) == []
    assert client.fileget('a.jpg', coll='Fish').body == b'fish'


# --- Restoring ----------------------------------------------------------------------------------------------

def test_a_restored_original_is_served_again_with_its_checksum_from_ingest(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    entry = client.app.storage.restore(None, only_entry(client).id)
    assert entry.name == 'a.jpg'
    answer = client.fileget('a.jpg')
    assert (answer.body, answer.headers['Repr-Digest']) == (b'photo', repr_digest(b'photo'))
    assert client.app.storage.checksum(None, 'a.jpg').recorded == 'ingest'
    assert client.trash_entries() == [] and client.all_files() == {'originals/a.jpg'}


def test_a_restored_original_is_found_by_its_checksum_again(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    client.app.storage.restore(None, only_entry(client).id)
    assert client.app.storage.names_with_sha256(None, hashlib.sha256(b'photo').hexdigest()) == ['a.jpg']


def test_a_trashed_original_is_not_restored_over_a_file_stored_again_under_its_name(client):
    client.upload('a.jpg', b'old')
    client.delete('a.jpg')
    client.upload('a.jpg', b'new')
    with pytest.raises(FileExistsError):
        client.app.storage.restore(None, only_entry(client).id)
    assert client.fileget('a.jpg').body == b'new' and client.trash_entries() == ['a.jpg']


@pytest.mark.parametrize('entry_id', ['20260101T000000Z-000000000000', '../originals/a.jpg', 'a.jpg', ''])
def test_restoring_an_entry_that_is_not_there_is_refused(client, entry_id):
    client.upload('a.jpg', b'photo')
    with pytest.raises(FileNotFoundError):
        client.app.storage.restore(None, entry_id)
    assert client.fileget('a.jpg').body == b'photo'


def test_an_original_stored_without_a_checksum_is_restored_without_one(client):
    put = client.app.storage
    if client.config.STORAGE == 's3':
        put.client.put_object(Bucket=put.bucket, Key=f'{put.prefix}/originals/old.jpg', Body=b'old server')
    else:
        os.makedirs(client.path('originals'), exist_ok=True)
        with open(client.path('originals', 'old.jpg'), 'wb') as f:
            f.write(b'old server')
    client.delete('old.jpg')
    put.restore(None, only_entry(client).id)
    answer = client.fileget('old.jpg')
    assert answer.body == b'old server' and 'Repr-Digest' not in answer.headers


@pytest.mark.disk_only
def test_a_trash_record_without_its_bytes_is_no_entry(client):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    os.remove(client.path('.trash', only_entry(client).id))          # as a crash between the two can leave
    assert list(client.app.storage.trashed(None)) == []


# --- Purging ------------------------------------------------------------------------------------------------

def test_entries_past_retention_are_purged_and_newer_ones_kept(make_client):
    client = make_client(TRASH_DAYS=30)
    client.upload('old.jpg', b'old')
    client.delete('old.jpg')
    time.sleep(0.05)
    client.upload('new.jpg', b'new')
    client.delete('new.jpg')
    old, _new = client.app.storage.trashed(None)
    purged = client.app.trash.purge_expired(now=old.deleted + 30 * 86400 + 0.01)
    assert [entry.name for _, entry in purged] == ['old.jpg']
    assert client.trash_entries() == ['new.jpg']


def test_nothing_is_purged_within_retention(make_client):
    client = make_client(TRASH_DAYS=30)
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    assert client.app.trash.purge_expired(now=time.time() + 29 * 86400) == []
    assert client.trash_entries() == ['a.jpg']


def test_a_purge_removes_the_entry_for_good_and_is_audited(make_client):
    client = make_client(TRASH_DAYS=1)
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    entry = only_entry(client)
    client.app.trash.purge_expired(now=time.time() + 86401)
    assert client.stored_files() == set()
    last = audit_lines(client)[-1]
    assert (last['action'], last['name'], last['trash'], last['sha256'], last['client']) == (
        'purge', 'a.jpg', entry.id, hashlib.sha256(b'photo').hexdigest(), None)


def test_a_request_starts_a_background_purge_of_what_is_past_retention(make_client):
    client = make_client(TRASH_DAYS=1)
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    client.app.trash.days = 1e-9                        # the entry is now past retention
    client.app.trash._purged_at = None                  # and a purge is due
    client.get('/health', {}, status='*')
    assert wait_for(lambda: client.trash_entries() == [], 10)


def test_after_the_start_a_purge_is_due_an_hour_later_and_then_at_most_once_an_hour(make_client):
    client = make_client(TRASH_DAYS=1)
    now = time.time()
    assert not client.app.trash.purge_due(now + 3590)
    assert client.app.trash.purge_due(now + 3601) and not client.app.trash.purge_due(now + 3601 + 3599)
    assert client.app.trash.purge_due(now + 3601 + 3600)


def test_the_server_purges_the_trash_as_it_starts(tmp_path):
    folder = tmp_path / 'attachments'
    first = Client(load_config({'BASE_DIR': str(folder), 'KEY': KEY, 'ACCESS_LOG': False}, environ={}))
    first.upload('a.jpg', b'photo')
    first.delete('a.jpg')
    entry = next(first.app.storage.trashed(None))
    record = folder / '.trash' / (entry.id + '.json')
    record.write_text(record.read_text().replace(str(entry.deleted), str(entry.deleted - 2 * 86400)))
    web = RunningServer(folder, tmp_path / 'server.log', TRASH_DAYS='1', KEY=KEY)
    try:
        assert wait_for(lambda: not record.exists(), 10)
    finally:
        web.stop()
    assert json.loads((folder / 'audit.jsonl').read_text().splitlines()[-1])['action'] == 'purge'


def test_trash_days_must_be_a_whole_number_0_or_more(tmp_path):
    for bad in (-1, 1.5, 'thirty'):
        with pytest.raises(ConfigError, match='setting TRASH_DAYS must be a whole number, 0 or more'):
            load_config({'BASE_DIR': str(tmp_path), 'TRASH_DAYS': bad}, environ={})
