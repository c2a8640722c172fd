"""Cheap attacks on getmetadata (no key needed): files that make the EXIF parser loop or blow up.

The real server (`python server.py`) is attacked over loopback, on disk and on S3 (SeaweedFS); the
limits' finer points are checked in-process. A crafted file must cost its own client a clean 422
(or 503 with Retry-After when the readers are busy), within seconds, while others are served.
"""

import json
import os
import secrets
import signal
import struct
import threading
import time
from urllib.parse import urlencode

import pytest

from conftest import KEY, RunningServer, multipart_body, wait_for, with_exif
import server

TOO_LARGE = "This file's metadata is too large or too complex to read."
MEMORY_BOUND = 350 * 1024 ** 2     # RSS of the server and its children together, with the default limits


def looping_heic(marker=b''):
    """104 bytes: an ftyp box, then a box whose 64-bit size is 0, so exifread seeks back to it forever."""
    ftyp = struct.pack('>I', 24) + b'ftypheic' + struct.pack('>I', 0) + b'mif1heic'
    loop = struct.pack('>I', 1) + b'free' + struct.pack('>Q', 0)
    return (ftyp + loop + marker).ljust(104, b'\0')


def amplifying_tiff(tags=1500, block=900_000):
    """A ~1 MB TIFF whose IFD0 has `tags` ASCII entries that all point at one `block`-byte text."""
    data_at = 8 + 2 + 12 * tags + 4
    entries = b''.join(struct.pack('<HHII', 0x8000 + i, 2, block, data_at) for i in range(tags))
    return (b'II*\0' + struct.pack('<I', 8) + struct.pack('<H', tags) + entries + struct.pack('<I', 0)
            + b'A' * (block - 1) + b'\0')


# --- Measuring the server from outside ---------------------------------------------------------

def children_of(pid):
    """Pids of the processes whose parent is `pid`."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat', 'rb') as stat:
                    if int(stat.read().rsplit(b')', 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def rss(pid):
    """Resident bytes of one process (0 once it is gone)."""
    try:
        with open(f'/proc/{pid}/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def cpu_seconds(pid):
    """CPU time of a process, its live children and the children it has reaped."""
    def own(one, reaped):
        try:
            with open(f'/proc/{one}/stat', 'rb') as stat:
                fields = stat.read().rsplit(b')', 1)[1].split()
        except OSError:
            return 0
        return sum(int(value) for value in fields[11:15 if reaped else 13]) / os.sysconf('SC_CLK_TCK')
    return own(pid, True) + sum(own(child, False) for child in children_of(pid))


def cpu_goes_quiet(pid, seconds=20):
    """True once the server and its children use less than a tenth of a CPU over a second."""
    def quiet():
        before = cpu_seconds(pid)
        time.sleep(1)                   # the measuring interval, not a synchronization
        return cpu_seconds(pid) - before < 0.1
    return wait_for(quiet, seconds)


class PeakMemory:
    """Largest RSS of a process and its children together, sampled until stopped."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss(self.pid) + sum(map(rss, children_of(self.pid))))

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak


# --- The real server -----------------------------------------------------------------------------

@pytest.fixture(params=['disk', 's3'])
def launch(request, tmp_path):
    """Start `python server.py` on disk or on S3 with the default metadata limits, overridden by keywords."""
    base = {'ACCESS_LOG': 'false', 'PREGENERATE_SCALE': 'none'}
    if request.param == 's3':
        base.update(request.getfixturevalue('seaweed').settings(prefix='attack-' + secrets.token_hex(6)))
    started = []

    def start(**env):
        started.append(RunningServer(tmp_path / 'attachments', tmp_path / 'server.log', **base, **env))
        return started[-1]
    yield start
    for running in started:
        running.stop()


@pytest.fixture
def web(launch):
    return launch()


def upload(web, name, data):
    content_type, body = multipart_body([('file', 'blob', data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', server.make_token(KEY, name))])
    assert web.request('POST', '/fileupload', body, {'Content-Type': content_type})[::2] == (200, b'Ok.')


def getmetadata(web, name, dt='json', timeout=30):
    """(status, headers, body, seconds taken) of GET /getmetadata as Specify 6 sends it (no token)."""
    started = time.monotonic()
    status, headers, body = web.request('GET', '/getmetadata?' + urlencode({'filename': name, 'coll': 'Fish', 'dt': dt}),
                                        timeout=timeout)
    return status, headers, body, time.monotonic() - started


def signed_testkey(web):
    random = secrets.token_hex(4)
    return web.request('GET', '/testkey?' + urlencode({'random': random, 'token': server.make_token(KEY, random)}),
                       timeout=30)[::2]


def test_a_looping_heic_is_answered_422_within_seconds_and_leaves_no_cpu_busy(web):
    upload(web, 'loop.heic', looping_heic())
    status, _, body, seconds = getmetadata(web, 'loop.heic')
    assert (status, body.decode()) == (422, TOO_LARGE)
    assert seconds < 15                         # METADATA_TIMEOUT is 5 s; the rest is a child's start under load
    assert cpu_goes_quiet(web.process.pid)


def test_an_amplifying_tiff_is_answered_422_while_the_servers_memory_stays_bounded(web):
    upload(web, 'amplified.tif', amplifying_tiff())
    memory = PeakMemory(web.process.pid)
    try:
        status, _, body, seconds = getmetadata(web, 'amplified.tif')
    finally:
        peak = memory.stop()
    assert (status, body.decode()) == (422, TOO_LARGE)
    assert seconds < 15
    assert peak < MEMORY_BOUND, f'{peak / 2**20:.0f} MiB'
    print(f'peak {peak / 2**20:.0f} MiB in {seconds:.2f} s')


def test_asking_again_for_a_file_found_beyond_the_limits_is_answered_at_once(web):
    upload(web, 'loop.heic', looping_heic())
    assert getmetadata(web, 'loop.heic')[0] == 422
    status, _, body, seconds = getmetadata(web, 'loop.heic')
    assert (status, body.decode()) == (422, TOO_LARGE)
    assert seconds < 1


def test_while_hostile_files_are_read_at_once_other_clients_are_served(launch, jpeg):
    web = launch(METADATA_WORKERS='3', METADATA_TIMEOUT='8')      # a reader each: the loop, the TIFF, the photo
    upload(web, 'loop.heic', looping_heic())
    upload(web, 'amplified.tif', amplifying_tiff())
    upload(web, 'photo.jpg', with_exif(jpeg, date='2023:04:05 06:07:08'))
    answers, sent = {}, time.monotonic()

    def ask(label, name):
        answers[label] = getmetadata(web, name)[:3] + (time.monotonic(),)
    attackers = [threading.Thread(target=ask, args=(f'{name} {i}', name))
                 for name in ('loop.heic', 'amplified.tif') for i in range(3)]
    for thread in attackers:
        thread.start()
    assert signed_testkey(web) == (200, b'Ok.')
    ask('photo', 'photo.jpg')
    served = time.monotonic()
    for thread in attackers:
        thread.join(60)
    assert served - sent < 10
    assert answers['photo'][0] == 200
    assert {group['Name'] for group in json.loads(answers['photo'][2])} == {'Image', 'EXIF', 'GPS'}
    assert all(answers[f'loop.heic {i}'][3] > served for i in range(3))      # the photo was served meanwhile
    assert {label: answer[:3:2] for label, answer in answers.items() if label != 'photo'} == {
        f'{name} {i}': (422, TOO_LARGE.encode()) for name in ('loop.heic', 'amplified.tif') for i in range(3)}
    assert cpu_goes_quiet(web.process.pid)


def cpu_limit(pid):
    """The soft 'Max cpu time' of a process: a reader sets it when it starts on a file."""
    try:
        with open(f'/proc/{pid}/limits') as table:
            return [line.split()[3] for line in table if line.startswith('Max cpu time')][0]
    except OSError:
        return None


def gone(pid):
    """True once the process has ended (a zombie counts: it runs no more)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as stat:
            return stat.read().rsplit(b')', 1)[1].split()[0] == b'Z'
    except OSError:
        return True


@pytest.mark.parametrize('launch', ['disk'], indirect=True)
def test_a_server_killed_while_a_reader_spins_leaves_no_reader_behind(launch):
    web = launch(METADATA_TIMEOUT='5')
    upload(web, 'loop.heic', looping_heic())
    asking = threading.Thread(target=lambda: pytest.raises(OSError, getmetadata, web, 'loop.heic'), daemon=True)
    asking.start()
    assert wait_for(lambda: readers_of(web.process.pid), 30)
    reader = readers_of(web.process.pid)[0]
    assert wait_for(lambda: cpu_limit(reader) not in (None, 'unlimited'), 30)     # it has the file: spinning
    web.process.send_signal(signal.SIGKILL)
    web.process.wait(10)
    try:
        assert wait_for(lambda: gone(reader), 120)          # its CPU limit ends it, orphaned as it is
    finally:
        if not gone(reader):
            os.kill(reader, signal.SIGKILL)
    asking.join(30)


# --- The limits, in-process ------------------------------------------------------------------------

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


def readers_of(pid):
    """Pids of the metadata readers (children) of process `pid`."""
    def command(child):
        try:
            with open(f'/proc/{child}/cmdline', 'rb') as cmdline:
                return cmdline.read()
        except OSError:
            return b''
    return [child for child in children_of(pid) if b'metadata_child' in command(child)]


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
