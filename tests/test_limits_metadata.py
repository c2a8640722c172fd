"""The metadata limits' finer points, in-process (WebTest): values cut, answers and reads bounded, a reader's
address space, and the readers' queue. The attacks themselves, on a real server, are in test_hostile.py."""

import os
import secrets
import threading
import time

import pytest

from harness.images import with_exif
from harness.processes import wait_for
from test_hostile import TOO_LARGE, amplifying_tiff, looping_heic, readers_of


def metadata(client, name, dt='json', status=None):
    return client.get('/getmetadata', {'filename': name, 'coll': 'Fish', 'dt': dt}, status=status)


@pytest.mark.disk_only
def test_a_value_longer_than_metadata_max_value_is_cut_and_ends_with_an_ellipsis(make_client, jpeg):
    client = make_client(METADATA_MAX_VALUE=20)
    client.upload('a.jpg', with_exif(jpeg, make='M' * 100))
    groups = {group['Name']: group['Fields'] for group in metadata(client, 'a.jpg').json}
    assert groups['Image']['Make'] == 'M' * 19 + '\u2026'


@pytest.mark.disk_only
def test_metadata_larger_than_metadata_max_answer_is_422(make_client, jpeg):
    client = make_client(METADATA_MAX_ANSWER=100)
    client.upload('a.jpg', with_exif(jpeg, make='M' * 200, date='2023:04:05 06:07:08'))
    assert metadata(client, 'a.jpg', status=422).text == TOO_LARGE


@pytest.mark.disk_only
def test_a_file_whose_metadata_needs_more_than_metadata_memory_limit_is_422(make_client):
    client = make_client(METADATA_MEMORY_LIMIT=100 * 1024 ** 2, METADATA_MAX_READ=2 * 1024 ** 3, METADATA_MAX_VALUE=10)
    client.upload('amplified.tif', amplifying_tiff(tags=300))          # 270 MB of text once read
    assert metadata(client, 'amplified.tif', status=422).text == TOO_LARGE


@pytest.mark.disk_only
def test_a_reader_runs_with_its_address_space_limited_to_metadata_memory_limit(make_client, jpeg):
    limit = 96 * 1024 ** 2 + 4096 * secrets.randbelow(1024)      # tells this test's reader from others'
    client = make_client(METADATA_MEMORY_LIMIT=limit)
    client.upload('a.jpg', with_exif(jpeg))
    metadata(client, 'a.jpg')
    (reader,) = [pid for pid in readers_of(os.getpid()) if str(limit).encode() in open(f'/proc/{pid}/cmdline', 'rb').read()]
    with open(f'/proc/{reader}/limits') as table:
        assert [line.split()[3] for line in table if line.startswith('Max address space')] == [str(limit)]


@pytest.mark.disk_only
def test_a_file_whose_metadata_needs_more_than_metadata_max_read_is_422(make_client):
    client = make_client(METADATA_MAX_READ=1024 ** 2)
    client.upload('long.tif', amplifying_tiff(tags=1, block=2 * 1024 ** 2))    # one 2 MiB text
    assert metadata(client, 'long.tif', status=422).text == TOO_LARGE


@pytest.mark.disk_only
def test_dt_date_of_a_file_beyond_the_limits_is_422_not_a_missing_date(make_client):
    client = make_client()
    client.upload('amplified.tif', amplifying_tiff())
    assert metadata(client, 'amplified.tif', dt='date', status=422).text == TOO_LARGE


def in_background(client, name):
    """Ask for a file's metadata in another thread; returns the thread."""
    thread = threading.Thread(target=metadata, args=(client, name), kwargs={'status': '*'}, daemon=True)
    thread.start()
    return thread


@pytest.mark.disk_only
def test_a_request_finding_every_reader_busy_waits_metadata_wait_then_gets_503_with_retry_after(make_client, jpeg):
    client = make_client(METADATA_WORKERS=1, METADATA_TIMEOUT=3, METADATA_WAIT=1)
    client.upload('loop.heic', looping_heic())
    client.upload('a.jpg', with_exif(jpeg, date='2023:04:05 06:07:08'))
    looping = in_background(client, 'loop.heic')
    assert wait_for(lambda: client.app.metadata.slots._value == 0)
    started = time.monotonic()
    answer = metadata(client, 'a.jpg', status=503)
    assert 1 <= time.monotonic() - started < 2.5
    assert (answer.text, answer.headers['Retry-After']) == ('The server is busy reading metadata; try again shortly.', '3')
    looping.join(30)


@pytest.mark.disk_only
def test_requests_beyond_those_that_may_wait_get_503_at_once(make_client, jpeg):
    client = make_client(METADATA_WORKERS=1, THREADS=5, METADATA_TIMEOUT=4, METADATA_WAIT=3)   # 1 reads, 1 waits
    for marker in (b'1', b'2'):
        client.upload(f'loop{marker.decode()}.heic', looping_heic(marker))
    client.upload('a.jpg', with_exif(jpeg, date='2023:04:05 06:07:08'))
    threads = [in_background(client, 'loop1.heic'), in_background(client, 'loop2.heic')]
    assert wait_for(lambda: client.app.metadata.admitted._value == 0)
    started = time.monotonic()
    assert metadata(client, 'a.jpg', status=503).headers['Retry-After'] == '4'
    assert time.monotonic() - started < 0.5
    for thread in threads:
        thread.join(30)
