"""The audit log: one JSON line per change to an original, appended and synced before the change is answered,
surviving log rotation, never holding the key or a token."""

import errno
import hashlib
import json
import os

import pytest

from harness.client import KEY


def lines(client):
    """The audit log's entries, in order."""
    with open(client.config.AUDIT_LOG, encoding='ascii') as log:
        return [json.loads(line) for line in log]


def test_an_upload_is_recorded_with_collection_name_size_sha256_client_and_outcome(client):
    client.web.extra_environ['REMOTE_ADDR'] = '192.0.2.7'
    client.upload('a.jpg', b'photo bytes')
    [entry] = lines(client)
    assert {key: entry[key] for key in ('action', 'collection', 'name', 'size', 'sha256', 'client', 'outcome')} == {
        'action': 'upload', 'collection': 'Fish', 'name': 'a.jpg', 'size': 11,
        'sha256': hashlib.sha256(b'photo bytes').hexdigest(), 'client': '192.0.2.7', 'outcome': 'ok'}


def test_an_entry_says_when_in_utc(client):
    client.upload('a.jpg', b'data')
    assert lines(client)[0]['time'].endswith('Z') and len(lines(client)[0]['time']) == 20


def test_an_upload_over_a_stored_original_is_recorded_as_a_replace(client):
    client.upload('a.jpg', b'first')
    client.upload('a.jpg', b'second')
    assert [(e['action'], e['sha256']) for e in lines(client)] == [
        ('upload', hashlib.sha256(b'first').hexdigest()), ('replace', hashlib.sha256(b'second').hexdigest())]


def test_a_delete_is_recorded_with_the_size_and_sha256_of_what_it_removed(client):
    client.upload('a.jpg', b'data')
    client.delete('a.jpg')
    entry = lines(client)[-1]
    assert (entry['action'], entry['name'], entry['size'], entry['sha256'], entry['outcome']) == (
        'delete', 'a.jpg', 4, hashlib.sha256(b'data').hexdigest(), 'ok')


def test_an_upload_the_storage_has_no_room_for_is_recorded_with_its_refusal(client, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(client.app.storage, 'save', full)
    client.upload('a.jpg', b'data', status=507)
    [entry] = lines(client)
    assert (entry['action'], entry['outcome']) == ('upload', '507 The server has no room to store this file.')


def test_an_upload_to_an_unknown_collection_is_recorded_as_refused(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.jpg', b'data', coll='Birds', status=404)
    assert [(e['action'], e['collection'], e['outcome']) for e in lines(client)] == [
        ('upload', 'Birds', '404 unknown collection')]


def test_a_request_without_a_valid_token_leaves_no_entry(client):
    client.upload('a.jpg', b'data', token='bad', status=403)
    client.delete('a.jpg', token='bad', status=403)
    assert not os.path.exists(client.config.AUDIT_LOG)


def test_a_delete_of_a_missing_file_leaves_no_entry(client):
    client.delete('missing.jpg', status=404)
    assert not os.path.exists(client.config.AUDIT_LOG)


def test_the_log_holds_neither_the_key_nor_a_token(client):
    token = client.token('a.jpg')
    client.upload('a.jpg', b'data', token=token)
    client.delete('a.jpg')
    with open(client.config.AUDIT_LOG, encoding='ascii') as log:
        text = log.read()
    assert KEY not in text and token not in text and token.split(':')[0] not in text


def test_a_log_moved_away_by_rotation_keeps_its_lines_and_the_next_goes_to_a_new_file(client):
    client.upload('a.jpg', b'first')
    os.rename(client.config.AUDIT_LOG, client.config.AUDIT_LOG + '.1')
    client.upload('b.jpg', b'second')
    with open(client.config.AUDIT_LOG + '.1', encoding='ascii') as rotated:
        assert [json.loads(line)['name'] for line in rotated] == ['a.jpg']
    assert [entry['name'] for entry in lines(client)] == ['b.jpg']


@pytest.mark.parametrize('name', ['line\nbreak.jpg', 'Käfer.jpg', 'tab\there.jpg', '\U0001F41F.jpg'])
def test_a_name_is_recorded_exactly_on_one_line(client, name):
    client.upload(name, b'data')
    [entry] = lines(client)
    assert entry['name'] == name


def test_the_log_is_where_audit_log_says(make_client, tmp_path):
    client = make_client(AUDIT_LOG=str(tmp_path / 'logs' / 'changes.jsonl'))
    client.upload('a.jpg', b'data')
    assert client.config.AUDIT_LOG == str(tmp_path / 'logs' / 'changes.jsonl')
    assert [entry['name'] for entry in lines(client)] == ['a.jpg']


def test_by_default_the_log_is_in_the_attachments_folder(client):
    assert client.config.AUDIT_LOG == os.path.join(client.config.BASE_DIR, 'audit.jsonl')
