"""`python preservation.py`: verify reports exactly the originals changed, missing, unreadable or stored without a
checksum; record, duplicates and the trash; --json, exit status, resuming, throttling."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

import preservation
from harness.client import KEY
from harness.mariadb import MariaDB
from harness.processes import PROJECT


@pytest.fixture
def run(make_client, storage, tmp_path, capsys):
    """preservation.py's main on the test's storage: (exit status, the JSON report or the lines printed)."""
    def invoke(*argv, **settings):
        environ = {'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY,
                   **{name: str(value) for name, value in {**storage, **settings}.items()}}
        capsys.readouterr()
        status = preservation.main(['--json', *argv], environ=environ)
        out = capsys.readouterr().out
        return status, json.loads(out) if out.strip() else None
    return invoke


def stored_behind_the_servers_back(client, name, data):
    """Write an original's bytes without the server (a failing disk, another tool, an S3 PUT of its own)."""
    if client.config.STORAGE == 's3':
        storage = client.app.storage
        storage.client.put_object(Bucket=storage.bucket, Key=f'{storage.prefix}/originals/{name}', Body=data)
        return
    os.makedirs(client.path('originals'), exist_ok=True)
    with open(client.path('originals', name), 'r+b' if os.path.exists(client.path('originals', name)) else 'wb') as f:
        f.truncate(0)
        f.write(data)


def removed_behind_the_servers_back(client, name):
    if client.config.STORAGE == 's3':
        storage = client.app.storage
        storage.client.delete_object(Bucket=storage.bucket, Key=f'{storage.prefix}/originals/{name}')
    else:
        os.remove(client.path('originals', name))


def problems(report):
    return sorted((p['name'], p['problem']) for p in report['problems'])


def uploaded(client, count=4):
    data = {f'{i}.jpg': os.urandom(1000 + i) for i in range(count)}
    for name, body in data.items():
        client.upload(name, body)
    return data


# --- verify -----------------------------------------------------------------------------------------------------

def test_verify_of_intact_originals_reports_nothing_and_exits_0(client, run):
    uploaded(client)
    status, report = run('verify')
    assert (status, report['counts'], report['problems']) == (0, {'ok': 4}, [])


def test_verify_reports_a_flipped_byte_exactly(client, run):
    data = uploaded(client)
    flipped = bytearray(data['1.jpg'])
    flipped[500] ^= 0x01
    stored_behind_the_servers_back(client, '1.jpg', bytes(flipped))
    status, report = run('verify')
    assert (status, problems(report)) == (1, [('1.jpg', 'changed')])
    [problem] = report['problems']
    assert (problem['expected'], problem['found']) == (hashlib.sha256(data['1.jpg']).hexdigest(),
                                                         hashlib.sha256(bytes(flipped)).hexdigest())


def test_verify_reports_a_truncated_original_exactly(client, run):
    data = uploaded(client)
    stored_behind_the_servers_back(client, '2.jpg', data['2.jpg'][:100])
    assert problems(run('verify')[1]) == [('2.jpg', 'changed')]


def test_verify_reports_an_original_deleted_behind_the_servers_back_as_missing(client, run):
    uploaded(client)
    removed_behind_the_servers_back(client, '3.jpg')
    status, report = run('verify')
    assert (status, problems(report), report['counts']) == (1, [('3.jpg', 'missing')], {'ok': 3, 'missing': 1})


def test_verify_reports_a_file_added_behind_the_servers_back_as_stored_without_a_checksum(client, run):
    uploaded(client)
    stored_behind_the_servers_back(client, 'stray.jpg', b'added by hand')
    assert problems(run('verify')[1]) == [('stray.jpg', 'no checksum')]


def test_verify_does_not_report_an_original_deleted_through_the_server(client, run):
    uploaded(client)
    client.delete('0.jpg')
    assert run('verify') == (0, {'command': 'verify', 'counts': {'ok': 3}, 'problems': []})


@pytest.mark.disk_only
def test_verify_reports_an_original_that_cannot_be_read_as_unreadable(client, run, monkeypatch):
    uploaded(client)
    real = preservation.sha256_of

    def failing(storage, coll, name, throttle):
        if name == '2.jpg':
            raise OSError(errno.EIO, 'Input/output error')
        return real(storage, coll, name, throttle)
    monkeypatch.setattr(preservation, 'sha256_of', failing)
    status, report = run('verify')
    assert (status, problems(report)) == (1, [('2.jpg', 'unreadable')])
    assert report['problems'][0]['error'] == 'Input/output error'


def test_a_stopped_verify_goes_on_after_the_last_original_it_finished(client, run, monkeypatch):
    uploaded(client, 6)
    stored_behind_the_servers_back(client, '1.jpg', b'changed early')
    read, real, interrupted = [], preservation.sha256_of, []

    def reading(storage, coll, name, throttle):
        if len(read) == 3 and not interrupted:
            interrupted.append(name)
            raise KeyboardInterrupt
        read.append(name)
        return real(storage, coll, name, throttle)
    monkeypatch.setattr(preservation, 'sha256_of', reading)
    assert run('verify')[0] == 2
    assert read == ['0.jpg', '1.jpg', '2.jpg']
    status, report = run('verify')
    assert read == ['0.jpg', '1.jpg', '2.jpg', '3.jpg', '4.jpg', '5.jpg']
    assert (status, problems(report), report['counts']) == (1, [('1.jpg', 'changed')], {'ok': 5, 'changed': 1})


def test_verify_with_restart_reads_every_original_again(client, run, monkeypatch):
    uploaded(client, 3)
    calls, real, interrupted = [], preservation.sha256_of, []

    def interrupted_once(storage, coll, name, throttle):
        calls.append(name)
        if len(calls) == 2 and not interrupted:
            interrupted.append(name)
            raise KeyboardInterrupt
        return real(storage, coll, name, throttle)
    monkeypatch.setattr(preservation, 'sha256_of', interrupted_once)
    assert run('verify')[0] == 2
    calls.clear()
    assert run('verify', '--restart')[1]['counts'] == {'ok': 3}
    assert calls == ['0.jpg', '1.jpg', '2.jpg']


def test_verify_reads_no_faster_than_max_rate(client, run):
    client.upload('big.bin', os.urandom(2_000_000))
    started = time.monotonic()
    run('verify', '--max-rate', '4')
    assert time.monotonic() - started >= 0.45           # 2 MB at 4 MB/s


def test_verify_of_one_collection_reads_only_it(make_client, run):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Plants': 'plants'})
    client.upload('a.jpg', b'fish', coll='Fish')
    client.upload('b.jpg', b'plant', coll='Plants')
    status, report = run('--collection', 'Fish', 'verify', COLLECTION_DIRS=json.dumps({'Fish': 'fish',
                                                                                        'Plants': 'plants'}))
    assert (status, report['counts']) == (0, {'ok': 1})


# --- record -----------------------------------------------------------------------------------------------------

def test_record_gives_originals_without_a_checksum_one_marked_later(client, run):
    stored_behind_the_servers_back(client, 'old.jpg', b'from the old server')
    status, report = run('record')
    assert (status, [r['name'] for r in report['recorded']]) == (0, ['old.jpg'])
    checksum = client.app.storage.checksum(None, 'old.jpg')
    assert (checksum.sha256, checksum.recorded) == (hashlib.sha256(b'from the old server').hexdigest(), 'later')
    assert client.fileget('old.jpg').body == b'from the old server'
    assert run('verify')[1]['counts'] == {'ok': 1}


def test_record_dry_run_records_nothing(client, run):
    stored_behind_the_servers_back(client, 'old.jpg', b'from the old server')
    assert [r['name'] for r in run('record', '--dry-run')[1]['recorded']] == ['old.jpg']
    assert client.app.storage.checksum(None, 'old.jpg') is None


def test_record_leaves_alone_originals_with_a_checksum_and_those_with_evidence_of_another(client, run):
    data = uploaded(client, 2)
    stored_behind_the_servers_back(client, '1.jpg', data['1.jpg'][:10])       # changed: verify's to report
    assert run('record')[1]['recorded'] == []
    assert problems(run('verify')[1]) == [('1.jpg', 'changed')]


# --- duplicates -------------------------------------------------------------------------------------------------

def test_duplicates_lists_the_groups_of_the_same_sha256_and_exits_1(client, run):
    for name, data in (('a.jpg', b'same'), ('b.jpg', b'other'), ('c.jpg', b'same')):
        client.upload(name, data)
    status, report = run('duplicates')
    assert (status, report['groups']) == (1, [{'collection': None, 'sha256': hashlib.sha256(b'same').hexdigest(),
                                               'names': ['a.jpg', 'c.jpg']}])


def test_no_duplicates_exits_0(client, run):
    uploaded(client)
    assert run('duplicates') == (0, {'command': 'duplicates', 'groups': [], 'problems': []})


# --- trash ------------------------------------------------------------------------------------------------------

def test_trash_list_names_each_entry(client, run):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    report = run('trash', 'list')[1]
    [entry] = report['entries']
    assert (entry['name'], entry['size'], entry['sha256']) == ('a.jpg', 5, hashlib.sha256(b'photo').hexdigest())
    assert report['bytes'] == 5


def test_trash_restore_puts_the_latest_back_and_audits_it(client, run):
    client.upload('a.jpg', b'first')
    client.delete('a.jpg')
    client.upload('a.jpg', b'second')
    client.delete('a.jpg')
    status, report = run('trash', 'restore', 'a.jpg')
    assert (status, [r['size'] for r in report['restored']]) == (0, [6])
    assert client.fileget('a.jpg').body == b'second'
    with open(client.config.AUDIT_LOG, encoding='ascii') as log:
        last = json.loads(log.readlines()[-1])
    assert (last['action'], last['name'], last['client']) == ('restore', 'a.jpg', 'preservation.py')


def test_trash_restore_of_a_name_stored_again_is_refused_and_exits_1(client, run):
    client.upload('a.jpg', b'old')
    client.delete('a.jpg')
    client.upload('a.jpg', b'new')
    status, report = run('trash', 'restore', 'a.jpg')
    assert (status, problems(report)) == (1, [('a.jpg', 'stored again since')])
    assert client.fileget('a.jpg').body == b'new'


def test_trash_restore_of_a_name_not_in_the_trash_exits_1(client, run):
    assert problems(run('trash', 'restore', 'nothing.jpg')[1]) == [('nothing.jpg', 'not in the trash')]


def test_trash_purge_removes_only_entries_past_retention(client, run):
    client.upload('a.jpg', b'photo')
    client.delete('a.jpg')
    assert run('trash', 'purge')[1]['purged'] == []
    assert [p['name'] for p in run('trash', 'purge', '--dry-run', TRASH_DAYS=0)[1]['purged']] == ['a.jpg']
    assert client.trash_entries() == ['a.jpg']
    assert [p['name'] for p in run('trash', 'purge', TRASH_DAYS=0)[1]['purged']] == ['a.jpg']
    assert client.trash_entries() == []


# --- Usage --------------------------------------------------------------------------------------------------------

def test_collection_without_collection_dirs_is_bad_usage_exit_2(client, run):
    assert run('--collection', 'Fish', 'verify')[0] == 2


def test_an_unknown_command_is_bad_usage_exit_2():
    done = subprocess.run([sys.executable, 'preservation.py', 'polish'], cwd=PROJECT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and 'invalid choice' in done.stderr


def test_without_json_each_problem_is_a_line_naming_the_file(client, make_client, storage, tmp_path):
    uploaded(client, 2)
    removed_behind_the_servers_back(client, '1.jpg')
    environ = {**os.environ, 'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY,
               **{name: str(value) for name, value in storage.items()}}
    done = subprocess.run([sys.executable, 'preservation.py', 'verify'], cwd=PROJECT, capture_output=True, text=True,
                          timeout=120, env=environ)
    assert (done.returncode, done.stdout.splitlines()) == (1, ['missing: 1.jpg', '1 ok, 1 missing'])


# --- reconcile --------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def specify_database(tmp_path_factory):
    """A real MariaDB with Specify's attachment table, read by a user that may only SELECT."""
    database = MariaDB(str(tmp_path_factory.mktemp('mariadb')))
    yield database
    database.stop()


@pytest.fixture
def two_days_on(monkeypatch):
    """The clock reconcile ages originals by, two days after the uploads."""
    later = time.time() + 2 * 86400
    monkeypatch.setattr(preservation, 'now', lambda: later)


def listed(tmp_path, *names):
    path = tmp_path / 'locations.txt'
    path.write_text(''.join(f'{name}\n' for name in names))
    return str(path)


def test_reconcile_reports_orphans_missing_and_restorable_exactly(client, run, tmp_path, two_days_on):
    for name in ('kept.jpg', 'orphan.jpg', 'deleted.jpg'):
        client.upload(name, name.encode())
    client.delete('deleted.jpg')
    status, report = run('reconcile', '--names', listed(tmp_path, 'kept.jpg', 'deleted.jpg', 'never-stored.jpg'))
    assert (status, problems(report)) == (1, [('deleted.jpg', 'missing, restorable'), ('never-stored.jpg', 'missing'),
                                              ('orphan.jpg', 'orphan')])
    assert [p['id'] for p in report['problems'] if p['problem'] == 'missing, restorable'] == [
        next(client.app.storage.trashed(None)).id]


def test_reconcile_never_calls_the_last_days_uploads_orphans(client, run, tmp_path):
    client.upload('just-uploaded.jpg', b'new')
    status, report = run('reconcile', '--names', listed(tmp_path))
    assert (status, report['problems'], [r['name'] for r in report['recent']]) == (0, [], ['just-uploaded.jpg'])


def test_reconcile_against_a_specify_database(client, run, specify_database, two_days_on):
    for name in ('a.jpg', 'b.jpg'):
        client.upload(name, b'data')
    specify_database.attachments('a.jpg', 'gone.pdf', None)
    status, report = run('reconcile', '--database', specify_database.url)
    assert (status, problems(report), report['referenced']) == (1, [('b.jpg', 'orphan'), ('gone.pdf', 'missing')], 2)


def test_reconcile_with_every_file_referenced_exits_0(client, run, specify_database, two_days_on):
    client.upload('a.jpg', b'data')
    specify_database.attachments('a.jpg')
    assert run('reconcile', '--database', specify_database.url)[0] == 0


@pytest.mark.parametrize('url', ['mysql://reader:wrong@127.0.0.1:{port}/specify', 'postgres://x@127.0.0.1/specify',
                                 'mysql://reader@127.0.0.1:{port}/'])
def test_a_database_that_cannot_be_read_is_bad_usage_exit_2(client, run, specify_database, url):
    assert run('reconcile', '--database', url.format(port=specify_database.port)) == (2, None)


def test_quarantine_moves_the_orphans_into_the_trash_and_audits_it(client, run, tmp_path, two_days_on):
    client.upload('orphan.jpg', b'orphan')
    client.upload('kept.jpg', b'kept')
    status, report = run('reconcile', '--names', listed(tmp_path, 'kept.jpg'), '--quarantine')
    assert [q['name'] for q in report['quarantined']] == ['orphan.jpg']
    client.fileget('orphan.jpg', status=404)
    assert client.trash_entries() == ['orphan.jpg'] and client.fileget('kept.jpg').body == b'kept'
    with open(client.config.AUDIT_LOG, encoding='ascii') as log:
        last = json.loads(log.readlines()[-1])
    assert (last['action'], last['name']) == ('quarantine', 'orphan.jpg')


def test_quarantine_dry_run_moves_nothing(client, run, tmp_path, two_days_on):
    client.upload('orphan.jpg', b'orphan')
    report = run('reconcile', '--names', listed(tmp_path), '--quarantine', '--dry-run')[1]
    assert [q['name'] for q in report['quarantined']] == ['orphan.jpg']
    assert client.fileget('orphan.jpg').body == b'orphan' and client.trash_entries() == []


def test_an_age_under_a_day_is_bad_usage_exit_2(client, run, tmp_path):
    assert run('reconcile', '--names', listed(tmp_path), '--older-than', '1') == (2, None)


# --- export-bag -------------------------------------------------------------------------------------------------

def validate(folder):
    """bagit-python's own validation of a bag (the Library of Congress's validator), as `bagit.py --validate`."""
    return subprocess.run([sys.executable, '-m', 'bagit', '--validate', str(folder)], capture_output=True, text=True,
                          timeout=120)


def test_an_exported_bag_is_valid_and_its_manifests_carry_the_checksums_from_ingest(client, run, tmp_path):
    data = uploaded(client, 3)
    client.upload('odd\nname 100%.jpg', b'odd name')
    status, report = run('export-bag', str(tmp_path / 'bag'))
    assert (status, report['files'], report['problems']) == (0, 4, [])
    done = validate(tmp_path / 'bag')
    assert done.returncode == 0, done.stderr
    manifest = (tmp_path / 'bag' / 'manifest-sha256.txt').read_text().splitlines()
    assert f'{hashlib.sha256(data["0.jpg"]).hexdigest()}  data/0.jpg' in manifest
    assert f'{hashlib.sha256(b"odd name").hexdigest()}  data/odd%0Aname 100%.jpg' in manifest
    assert (tmp_path / 'bag' / 'data' / 'odd\nname 100%.jpg').read_bytes() == b'odd name'


def test_a_bag_with_one_payload_byte_flipped_fails_validation(client, run, tmp_path):
    uploaded(client, 3)
    run('export-bag', str(tmp_path / 'bag'))
    payload = tmp_path / 'bag' / 'data' / '1.jpg'
    flipped = bytearray(payload.read_bytes())
    flipped[0] ^= 0xff
    payload.write_bytes(bytes(flipped))
    done = validate(tmp_path / 'bag')
    assert done.returncode != 0 and '1.jpg' in done.stderr


def test_a_bag_of_a_file_changed_since_ingest_fails_validation(client, run, tmp_path):
    data = uploaded(client, 2)
    flipped = bytearray(data['0.jpg'])
    flipped[10] ^= 0x01
    stored_behind_the_servers_back(client, '0.jpg', bytes(flipped))
    status, report = run('export-bag', str(tmp_path / 'bag'))
    if client.config.STORAGE == 's3':                   # the object's metadata went with its bytes: left out
        assert (status, problems(report)) == (1, [('0.jpg', 'changed since its checksum was recorded: left out')])
    else:
        assert validate(tmp_path / 'bag').returncode != 0


def test_an_original_without_a_checksum_is_left_out_and_reported(client, run, tmp_path):
    uploaded(client, 2)
    stored_behind_the_servers_back(client, 'old.jpg', b'no checksum')
    status, report = run('export-bag', str(tmp_path / 'bag'))
    assert (status, problems(report), report['files']) == (1, [('old.jpg', 'no checksum: left out')], 2)
    assert validate(tmp_path / 'bag').returncode == 0
    assert sorted(os.listdir(tmp_path / 'bag' / 'data')) == ['0.jpg', '1.jpg']


def test_a_stopped_export_goes_on_with_the_files_not_yet_copied(client, run, tmp_path, monkeypatch):
    uploaded(client, 4)
    copied, real, stopped = [], preservation.copy_into_bag, []

    def copying(storage, coll, name, target, size, throttle):
        if len(copied) == 2 and not stopped:
            stopped.append(name)
            raise KeyboardInterrupt
        copied.append(name)
        return real(storage, coll, name, target, size, throttle)
    monkeypatch.setattr(preservation, 'copy_into_bag', copying)
    assert run('export-bag', str(tmp_path / 'bag'))[0] == 2
    assert not (tmp_path / 'bag' / 'bagit.txt').exists()
    mtimes = {name: os.stat(tmp_path / 'bag' / 'data' / name).st_mtime_ns for name in ('0.jpg', '1.jpg')}
    assert run('export-bag', str(tmp_path / 'bag'))[0] == 0
    assert {name: os.stat(tmp_path / 'bag' / 'data' / name).st_mtime_ns for name in mtimes} == mtimes
    assert validate(tmp_path / 'bag').returncode == 0


def test_exporting_into_a_folder_that_holds_other_files_is_refused(client, run, tmp_path):
    (tmp_path / 'bag').mkdir()
    (tmp_path / 'bag' / 'notes.txt').write_text('mine')
    assert run('export-bag', str(tmp_path / 'bag')) == (2, None)
