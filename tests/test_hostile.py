"""Hostile input against a real running server: every cheap attack of issue 12 and the IIIF requests of issue 14,
as a client without the key would send it, over loopback, to `python server.py` (Paste) on disk, and on S3
(SeaweedFS) where the case is S3's.

A specification in sections, one per attack family. Every attack runs through `Target.attack`, which holds the
server to the promises every attack must keep, besides the clean answer each test names:
  (a) meanwhile, another client's GET /health and its cached thumbnail are answered within BYSTANDER_SECONDS;
  (b) the server's memory (its RSS and its children's, from /proc) stays below MEMORY_BOUND;
  (c) no CPU is left busy afterwards (the server's and its children's CPU time stops growing);
  (d) no answer is a 500: a 503 carries Retry-After, a 507 means no room, no body shows a traceback or a path;
  (e) nothing is written outside the attachments folder: the server runs with its working folder and TMPDIR in
      folders of their own, which stay empty, its code's folder is left as it was, and the attachments folder
      holds only originals, thumbnails and the key file (made there on first start).
Servers are shared by the tests of a configuration (each test uses names and bytes of its own). The last two
sections attack connections rather than files (slow and greedy clients, framing, resets) on plain servers of
their own, each with the settings it needs, and check what the client and a bystander see.
"""

import collections
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from urllib.parse import quote, urlencode

import pytest

import derivatives
import front
from waiting_room import WaitingRoom
import server
import test_iiif_grammar
from harness.client import KEY, multipart_body
from harness.images import image_info, IMAGEMAGICK, make_image, png_bytes, with_exif
from harness.processes import descendants, parent_pids, PROJECT, SERVER_SCRIPT, wait_for
from harness.servers import RunningServer
from test_protocol import specify6_body
from test_reliability import NO_ROOM, fill_up, small_disk, use_every_inode  # noqa: F401 (small_disk: a fixture)
from test_thumbnails import TWO_PAGES, gif, huge_page_pdf, nested_forms_pdf, pdf, with_fill_bytes
from config import load_config
from names import RECORD_FOLDERS, TEMP_PREFIX, pyramid_name, thumbnail_name
from tokens import make_token

MiB = 1024 ** 2
MEMORY_BOUND = 350 * MiB     # twice the largest peak measured (171 MiB, Ghostscript on a huge page): the unfixed
                             # server reached 934 MiB (a PNG) and 2.8 GiB (a TIFF's metadata)
BYSTANDER_SECONDS = 2        # what another client may wait, while the server is attacked, for an answer needing no work
BYSTANDER = '127.0.0.200'    # that other client's address (the attacks come from 127.0.0.1 and 127.0.0.2)
KEY_FILE = '.web-asset-server.key'
TOO_LARGE = "This file's metadata is too large or too complex to read."


# === The harness ==================================================================================================

Answer = collections.namedtuple('Answer', 'status headers body seconds')


def ask(web, method, path, body=None, headers=None, timeout=60, source='127.0.0.1'):
    """One request on a fresh connection from `source`, as an Answer with the seconds it took."""
    started = time.monotonic()
    status, headers, body = web.request(method, path, body, headers, timeout=timeout, source=source)
    return Answer(status, headers, body, time.monotonic() - started)


def raw_exchange(port, request, seconds=10):
    """The Answer to these exact bytes, read until the server closes the connection."""
    started = time.monotonic()
    with socket.create_connection(('127.0.0.1', port), timeout=seconds) as connection:
        connection.sendall(request)
        received = b''
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b'\r\n\r\n')
    status_line, *lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.split(': ', 1) for line in lines)
    return Answer(int(status_line.split()[1]), headers, body, time.monotonic() - started)


def unique(name):
    """`name` made this test's own, so tests sharing a server never see each other's files."""
    root, ext = os.path.splitext(name)
    return f'{root}-{secrets.token_hex(4)}{ext}'


def project_files():
    """(path, mtime, size) of every file of the server's code folder, but the caches Python and test tools keep."""
    skip = {'.git', '__pycache__', '.pytest_cache', '.hypothesis'}
    found = set()
    for folder, dirs, files in os.walk(PROJECT):
        dirs[:] = [name for name in dirs if name not in skip]
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            found.add((os.path.join(folder, name), info.st_mtime_ns, info.st_size))
    return found


def rss(pid):
    """Resident bytes of one process (0 once it is gone)."""
    try:
        with open(f'/proc/{pid}/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


class PeakMemory:
    """Largest RSS of a process and its descendants together, sampled until stopped."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, self.now())
            if self.done.wait(0.02):
                return

    def now(self):
        return rss(self.pid) + sum(map(rss, descendants(self.pid)))

    def stop(self):
        """The peak, sampled once more now (an attack may end between two samples)."""
        self.done.set()
        self.thread.join()
        return max(self.peak, self.now())


def cpu_seconds(pid):
    """CPU time of a process, the children it has reaped and its live descendants."""
    def own(one, reaped):
        try:
            with open(f'/proc/{one}/stat', 'rb') as stat:
                fields = stat.read().rsplit(b')', 1)[1].split()
        except OSError:
            return 0
        return sum(int(value) for value in fields[11:15 if reaped else 13]) / os.sysconf('SC_CLK_TCK')
    return own(pid, True) + sum(own(child, False) for child in descendants(pid))


def cpu_goes_quiet(pid, seconds=20):
    """True once the server and its children use less than a tenth of a CPU over half a second."""
    def quiet():
        before = cpu_seconds(pid)
        time.sleep(0.5)                   # the measuring interval, not a synchronization
        return cpu_seconds(pid) - before < 0.05
    return wait_for(quiet, seconds)


class Background:
    """job() run in a thread of its own; joined() gives its result, or raises its error, in the test's thread."""

    def __init__(self, job):
        self.job, self.outcome = job, {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.outcome['result'] = self.job()
        except BaseException as error:        # handed to the joining test
            self.outcome['error'] = error

    def running(self):
        return self.thread.is_alive()

    def joined(self, seconds=120):
        self.thread.join(seconds)
        assert not self.thread.is_alive(), 'the request did not end'
        if 'error' in self.outcome:
            raise self.outcome['error']
        return self.outcome['result']


def answers_in(result):
    """The Answers in what an attack returned: one, or any found in its lists, tuples and dicts."""
    if isinstance(result, Answer):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [answer for item in result for answer in answers_in(item)]
    return []


class Target:
    """A real `python server.py` in folders of its own: the attachments folder (where it makes its key file), its
    working folder and its TMPDIR; it keeps a bystander photo whose thumbnail is cached, for promise (a)."""

    def __init__(self, root, bystander, **settings):
        self.root, self.attachments, self.cwd, self.tmp = root, root / 'attachments', root / 'cwd', root / 'tmp'
        self.s3 = settings.get('STORAGE') == 's3'
        for folder in (self.cwd, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        environment = {'ACCESS_LOG': 'false', 'PREGENERATE_SCALE': 'none', 'KEY': None, 'TMPDIR': str(self.tmp),
                       **settings}
        self.web = RunningServer(self.attachments, root / 'server.log', cwd=self.cwd, **environment)
        self.pid = self.web.process.pid
        try:
            self.key = settings.get('KEY') or (self.attachments / KEY_FILE).read_text().strip()
            self.project = project_files()
            self.stored('bystander.jpg', bystander)
            self.bystander = self.bystanders_thumbnail()
            assert self.bystander.status == 200
        except BaseException:
            self.web.stop()
            raise

    def stop(self):
        """Stop the server, and any child of its left running (a reader or a conversion it failed to end)."""
        children = descendants(self.pid)
        self.web.stop()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- Requests as Specify sends them ---

    def token(self, name):
        return make_token(self.key, name)

    def upload(self, name, data, coll='Fish'):
        content_type, body = multipart_body([('store', name), ('type', 'O'), ('coll', coll),
                                             ('token', self.token(name)), ('file', 'blob', data)])
        return ask(self.web, 'POST', '/fileupload', body, {'Content-Type': content_type})

    def stored(self, name, data):
        """Upload a file the test needs stored."""
        assert self.upload(name, data)[::2] == (200, b'Ok.')

    def bystanders_thumbnail(self):
        """What the bystander asks for: its photo's cached thumbnail (signed, in case reads need the key)."""
        return self.fileget('bystander.jpg', 'T', scale=64, token=self.token('bystander.jpg'), source=BYSTANDER)

    def fileget(self, name, kind='O', headers=None, source='127.0.0.1', **params):
        query = urlencode({'filename': name, 'type': kind, 'coll': 'Fish', **params})
        return ask(self.web, 'GET', '/fileget?' + query, headers=headers, source=source)

    def thumbnail(self, name, scale=123):
        return self.fileget(name, 'T', scale=scale)

    def getmetadata(self, name, dt='json'):
        """GET /getmetadata as Specify 6 sends it (no token)."""
        return ask(self.web, 'GET', '/getmetadata?' + urlencode({'filename': name, 'coll': 'Fish', 'dt': dt}))

    # --- The promises ---

    def attack(self, request, busy=None, memory_bound=MEMORY_BOUND):
        """Run request() (the attack) and hold the server to promises (a)-(e); returns what request() returned.
        `busy`: a condition that shows the attack is under way, before the bystander asks."""
        memory = PeakMemory(self.pid)
        try:
            attack = Background(request)
            try:
                if busy is not None:
                    assert wait_for(busy, 30), 'the attack never got under way'
                self.assert_bystander_served()
            finally:
                result = attack.joined()
        finally:
            peak = memory.stop()
        for answer in answers_in(result):
            self.assert_clean(answer)
        assert 0 < peak < memory_bound, f'the server and its children held {peak / MiB:.0f} MiB'
        assert cpu_goes_quiet(self.pid), 'the server keeps a CPU busy after the attack'
        self.assert_nothing_written_outside()
        return result

    def assert_bystander_served(self):
        """(a) Another client's health check and cached thumbnail are answered at once, as before."""
        health = ask(self.web, 'GET', '/health', source=BYSTANDER)
        thumbnail = self.bystanders_thumbnail()
        assert (health.status, health.seconds < BYSTANDER_SECONDS) == (200, True), health
        assert (thumbnail.status, thumbnail.body == self.bystander.body,
                thumbnail.seconds < BYSTANDER_SECONDS) == (200, True, True), thumbnail[::3]

    def assert_clean(self, answer):
        """(d) A status a client can act on, and a body that tells an attacker nothing of the machine."""
        assert answer.status < 500 or answer.status in (503, 507), answer
        if answer.status == 503:
            assert (answer.headers.get('Retry-After') or '0').isdigit() and int(answer.headers['Retry-After']) > 0, \
                'a 503 without Retry-After'
        if answer.status == 507:
            assert answer.body.startswith(b'The server has no room to'), answer.body
        for secret in (b'Traceback', b'File "', str(self.root).encode(), PROJECT.encode(), sys.prefix.encode()):
            assert secret not in answer.body, answer.body[:300]

    def strays(self):
        """Files in the attachments folder that are neither originals, thumbnails, the server's records of them,
        the key file, the audit log nor planted by the test itself (named planted-*); temporaries left behind
        count as strays. On S3 only the key file and the audit log."""
        found = []
        for folder, _dirs, files in os.walk(self.attachments):
            for name in files:
                parts = os.path.relpath(os.path.join(folder, name), self.attachments).split(os.sep)
                stored = (not self.s3 and (len(parts) in (2, 3) and parts[-2] in ('originals', 'thumbnails')
                                           or bool(set(parts[:-1]) & set(RECORD_FOLDERS)))
                          and not name.startswith(TEMP_PREFIX))
                if not (stored or parts in ([KEY_FILE], ['audit.jsonl']) or parts[0].startswith('planted-')):
                    found.append('/'.join(parts))
        return found

    def assert_nothing_written_outside(self):
        """(e) The working folder and TMPDIR stay empty, the code's folder as it was, the attachments folder ours."""
        assert (sorted(os.listdir(self.cwd)), sorted(os.listdir(self.tmp))) == ([], [])
        assert project_files() == self.project
        assert wait_for(lambda: not self.strays(), 10), self.strays()


def start_target(request, folder, bystander, storage='disk', **settings):
    """A Target on disk, or on S3 (the session's SeaweedFS, a fresh prefix)."""
    if storage == 's3':
        settings = {**request.getfixturevalue('seaweed').settings(prefix='hostile-' + secrets.token_hex(6)),
                    **settings}
    return Target(folder, bystander, **settings)


@pytest.fixture(scope='module')
def launch(request, tmp_path_factory, jpeg):
    """launch(storage='disk', **settings): the module's one server of that configuration, started on first use."""
    started = {}

    def get(storage='disk', **settings):
        configuration = (storage, tuple(sorted(settings.items())))
        if configuration not in started:
            started[configuration] = start_target(request, tmp_path_factory.mktemp('hostile'), jpeg, storage,
                                                  **settings)
        return started[configuration]
    yield get
    for target in started.values():
        target.stop()


@pytest.fixture
def fresh(request, tmp_path, jpeg):
    """fresh(storage='disk', folder=None, **settings): a server of this test's own, stopped after it."""
    started = []

    def start(storage='disk', folder=None, **settings):
        started.append(start_target(request, folder or tmp_path / f'server{len(started)}', jpeg, storage,
                                    **settings))
        return started[-1]
    yield start
    for target in started:
        target.stop()


STORAGES = pytest.mark.parametrize('store', ['disk', 's3'])


# === Metadata bombs: getmetadata needs no token ===================================================================

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


def own_heic():
    """A looping HEIC no other test uploads (the server remembers files beyond the limits by their bytes)."""
    return looping_heic(secrets.token_bytes(8))


def own_tiff():
    """An amplifying TIFF of a size no other test's has (the server remembers files by size and first bytes)."""
    return amplifying_tiff(tags=1400 + secrets.randbelow(200))


@STORAGES
def test_a_looping_heic_is_answered_422_within_seconds(launch, store):
    target = launch(store)
    name = unique('loop.heic')
    target.stored(name, own_heic())
    answer = target.attack(lambda: target.getmetadata(name))    # GET /getmetadata?filename=loop.heic&dt=json
    assert (answer.status, answer.body.decode()) == (422, TOO_LARGE)
    assert answer.seconds < 15                  # METADATA_TIMEOUT is 5 s; the rest is a child's start under load


@STORAGES
def test_an_amplifying_tiff_is_answered_422_with_a_short_answer(launch, store):
    target = launch(store)
    name = unique('amplified.tif')
    target.stored(name, own_tiff())
    answer = target.attack(lambda: target.getmetadata(name))      # held under MEMORY_BOUND by the harness
    assert (answer.status, answer.body.decode()) == (422, TOO_LARGE)
    assert answer.seconds < 15


@STORAGES
def test_asking_again_for_a_file_found_beyond_the_limits_is_answered_at_once(launch, store):
    target = launch(store)
    name = unique('loop.heic')
    target.stored(name, own_heic())
    assert target.getmetadata(name).status == 422
    answer = target.attack(lambda: target.getmetadata(name))
    assert (answer.status, answer.body.decode()) == (422, TOO_LARGE)
    assert answer.seconds < 1


def signed_testkey(target):
    random = secrets.token_hex(4)
    return ask(target.web, 'GET', '/testkey?' + urlencode({'random': random, 'token': target.token(random)}))


@STORAGES
def test_while_hostile_files_are_read_at_once_other_clients_are_served(launch, store, jpeg):
    target = launch(store, METADATA_WORKERS='3', METADATA_TIMEOUT='8')   # a reader each: loop, TIFF, photo
    loop, tiff, photo = unique('loop.heic'), unique('amplified.tif'), unique('photo.jpg')
    target.stored(loop, own_heic())
    target.stored(tiff, own_tiff())
    target.stored(photo, with_exif(jpeg, date='2023:04:05 06:07:08'))

    def attack():
        answers, sent = {}, time.monotonic()

        def asked(label, name):
            answers[label] = target.getmetadata(name), time.monotonic()
        attackers = [threading.Thread(target=asked, args=(f'{name} {i}', name)) for name in (loop, tiff)
                     for i in range(3)]
        for thread in attackers:
            thread.start()
        answers['testkey'] = signed_testkey(target), time.monotonic()
        asked('photo', photo)
        for thread in attackers:
            thread.join(60)
        return answers, sent
    answers, sent = target.attack(attack)
    served = answers['photo'][1]
    assert served - sent < 10
    assert answers['testkey'][0][::2] == (200, b'Ok.')
    assert answers['photo'][0].status == 200
    assert {group['Name'] for group in json.loads(answers['photo'][0].body)} == {'Image', 'EXIF', 'GPS'}
    assert all(answers[f'{loop} {i}'][1] > served for i in range(3))      # the photo was served meanwhile
    assert {label: (answer.status, answer.body) for label, (answer, _at) in answers.items()
            if label not in ('photo', 'testkey')} == {
        f'{name} {i}': (422, TOO_LARGE.encode()) for name in (loop, tiff) for i in range(3)}


def readers_of(pid):
    """Pids of the metadata readers (children) of process `pid`."""
    def command(child):
        try:
            with open(f'/proc/{child}/cmdline', 'rb') as cmdline:
                return cmdline.read()
        except OSError:
            return b''
    return [child for child, parent in parent_pids().items() if parent == pid and b'engines.exif_child' in command(child)]


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


def test_a_server_killed_while_a_reader_spins_leaves_no_reader_behind(fresh):
    target = fresh(METADATA_TIMEOUT='5')
    target.stored('loop.heic', looping_heic())
    asking = threading.Thread(target=lambda: pytest.raises(OSError, target.getmetadata, 'loop.heic'), daemon=True)
    asking.start()
    assert wait_for(lambda: readers_of(target.pid), 30)
    reader = readers_of(target.pid)[0]
    assert wait_for(lambda: cpu_limit(reader) not in (None, 'unlimited'), 30)     # it has the file: spinning
    target.web.process.send_signal(signal.SIGKILL)
    target.web.process.wait(10)
    try:
        assert wait_for(lambda: gone(reader), 120)          # its CPU limit ends it, orphaned as it is
    finally:
        if not gone(reader):
            os.kill(reader, signal.SIGKILL)
    asking.join(30)


# === Conversion starvation: hostile PDFs, remembered failures, the bounded queue ==================================

BOUNDED = {'THREADS': '8', 'THUMBNAIL_WORKERS': '1', 'THUMBNAIL_QUEUE': '2', 'THUMBNAIL_QUEUE_WAIT': '2',
           'THUMBNAIL_TIMEOUT': '6'}
TOOLS = {os.path.realpath(IMAGEMAGICK), os.path.realpath(shutil.which('gs'))}


def is_tool(pid):
    try:
        return os.path.realpath(f'/proc/{pid}/exe') in TOOLS
    except OSError:
        return False


def conversions_running(target):
    """Ghostscript or ImageMagick processes the server has running."""
    return [pid for pid in descendants(target.pid) if is_tool(pid)]


def test_a_pdf_with_a_huge_mediabox_is_thumbnailed_at_a_bounded_size_in_seconds(launch, tmp_path):
    target = launch(THUMBNAIL_TIMEOUT='20')
    name = unique('poster.pdf')
    target.stored(name, huge_page_pdf())            # a 200 000 pt page: 4e10 pixels at 72 dpi
    answer = target.attack(lambda: target.thumbnail(name))
    assert (answer.status, answer.headers['Content-Type']) == (200, 'image/png')
    assert answer.seconds < 10
    assert image_info(answer.body, tmp_path) == ('PNG', 123, 123)


def test_hostile_pdfs_beyond_the_queue_are_answered_503_with_retry_after_while_others_are_served(launch):
    target = launch(**BOUNDED)
    names = [unique(f'forms{i}.pdf') for i in range(10)]
    for name in names:
        target.stored(name, nested_forms_pdf())

    def attack():
        asking = [Background(lambda name=name: target.thumbnail(name)) for name in names]
        return [one.joined(60) for one in asking]
    started = time.monotonic()
    answers = target.attack(attack, busy=lambda: conversions_running(target))   # the bystander asks meanwhile
    assert collections.Counter(answer.status for answer in answers) == {503: 9, 404: 1}   # one converts; two wait
    assert all(answer.headers['Retry-After'] == '5' for answer in answers if answer.status == 503)   # 2 s; 7: full
    assert [answer.body for answer in answers if answer.status == 404] == [b'Making the thumbnail took too long.']
    assert time.monotonic() - started < 20


def test_a_second_request_for_a_failed_file_is_answered_at_once_with_the_same_reason(launch):
    target = launch(THUMBNAIL_TIMEOUT='3')
    name = unique('forms.pdf')
    target.stored(name, nested_forms_pdf())
    first = target.attack(lambda: target.thumbnail(name))
    second = target.attack(lambda: target.thumbnail(name))
    assert (first.status, first.body) == (second.status, second.body) == (404, b'Making the thumbnail took too long.')
    assert first.seconds >= 3
    assert second.seconds < 0.5


def test_a_reupload_clears_the_remembered_failure(launch, tmp_path):
    target = launch(THUMBNAIL_TIMEOUT='3')
    name = unique('notebook.pdf')
    target.stored(name, nested_forms_pdf())
    assert target.thumbnail(name).status == 404
    target.stored(name, pdf(tmp_path, TWO_PAGES))
    answer = target.attack(lambda: target.thumbnail(name))
    assert (answer.status, answer.headers['Content-Type']) == (200, 'image/png')


# === Conversion memory: estimates, the address-space limit, sizes sniffed robustly ================================

def interlaced_png(width, height):
    """A black 16-bit RGBA Adam7 PNG, made without ImageMagick: decoders hold it whole (8 bytes a pixel)."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    packer = zlib.compressobj(1)
    data = []
    for x0, y0, dx, dy in passes:
        columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if columns > 0 and rows > 0:
            row = bytes(1 + 8 * columns)
            data.extend(packer.compress(row) for _ in range(rows))
    data.append(packer.flush())

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 6, 0, 0, 1))
            + chunk(b'IDAT', b''.join(data)) + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def deep_png():
    return interlaced_png(11_000, 11_000)           # 968 MB decoded whole


def peak_memory_of_tools(target, request):
    """Run `request` in a thread; its result and the largest VmPeak and VmHWM (bytes) of the server's ImageMagick
    and Ghostscript children meanwhile (not a child forked but not yet turned into one: that is the server's copy)."""
    peaks = {'VmPeak': 0, 'VmHWM': 0}
    asking = Background(request)
    while asking.running():
        for pid in conversions_running(target):
            try:
                with open(f'/proc/{pid}/status') as status:
                    for line in status:
                        key, _, value = line.partition(':')
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except OSError:
                pass
        time.sleep(0.005)           # the sampling interval
    return asking.joined(), peaks


def test_a_deep_png_is_refused_by_its_memory_estimate_before_any_conversion_runs(launch, deep_png):
    target = launch()
    name = unique('deep.png')
    target.stored(name, deep_png)
    answer, peaks = target.attack(lambda: peak_memory_of_tools(target, lambda: target.thumbnail(name)))
    assert (answer.status, answer.body) == (404, b'The image would need too much memory to thumbnail.')
    assert peaks == {'VmPeak': 0, 'VmHWM': 0}


def test_a_conversion_past_the_estimate_stays_under_the_address_space_limit(launch, deep_png):
    limit = 512 * MiB
    target = launch(THUMBNAIL_MEMORY_LIMIT=str(4 * 1024 ** 3), THUMBNAIL_ADDRESS_SPACE_LIMIT=str(limit),
                    THUMBNAIL_TIMEOUT='30')                           # the estimate passes it to ImageMagick
    name = unique('deep.png')
    target.stored(name, deep_png)
    answer, peaks = target.attack(lambda: peak_memory_of_tools(target, lambda: target.thumbnail(name)),
                                  memory_bound=MEMORY_BOUND + limit)
    assert (answer.status, answer.body) == (404, b'This file could not be thumbnailed.')
    assert 0 < peaks['VmPeak'] <= limit


def test_a_jpeg_with_a_fill_byte_before_its_frame_is_refused_by_the_pixel_cap(launch, tmp_path):
    target = launch(THUMBNAIL_MAX_PIXELS='1000000')
    name = unique('filled.jpg')
    target.stored(name, with_fill_bytes(make_image(tmp_path, 'plasma:', '2000x1000', 'jpg')))
    answer = target.attack(lambda: target.thumbnail(name))
    assert (answer.status, answer.body) == (404, b'The image has too many pixels to thumbnail.')


def test_a_gif_frame_larger_than_its_one_pixel_screen_is_refused_by_the_pixel_cap(launch):
    target = launch(THUMBNAIL_MAX_PIXELS='1000000')
    name = unique('screen.gif')
    target.stored(name, gif((1, 1), [(0, 0, 10_000, 10_000)]))
    answer = target.attack(lambda: target.thumbnail(name))
    assert (answer.status, answer.body) == (404, b'The image has too many pixels to thumbnail.')


# === S3: a read pinned to one version ============================================================================

def etag_of(data):
    return '"%s"' % hashlib.md5(data).hexdigest()


def test_a_file_reuploaded_while_it_is_read_is_answered_whole_as_exactly_one_version(launch):
    target = launch('s3')
    name = unique('swap.tif')
    versions = {etag_of(data): data for data in (os.urandom(512 * 1024), os.urandom(512 * 1024))}  # the same size
    first, second = versions.values()
    target.stored(name, first)

    def reads_during_reuploads():          # GET /fileget?filename=swap.tif&type=O while another client re-uploads
        stop, reuploads = threading.Event(), []

        def reupload():
            for data in itertools.cycle((second, first)):
                if stop.is_set():
                    return reuploads
                reuploads.append(target.upload(name, data).status)
        uploader, answers, deadline = Background(reupload), [], time.monotonic() + 30
        try:                               # at least 40 reads while the file changed at least 10 times
            while (len(answers) < 40 or len(reuploads) < 10) and time.monotonic() < deadline:
                answers.append(target.fileget(name))
        finally:
            stop.set()
        return answers, uploader.joined(60)
    answers, reuploads = target.attack(reads_during_reuploads)
    assert len(reuploads) >= 10 and set(reuploads) == {200}      # the file really changed while it was read
    assert [(answer.status, versions.get(answer.headers['ETag']) == answer.body) for answer in answers] == [
        (200, True)] * len(answers)


# === Conditional requests ========================================================================================

@STORAGES
def test_a_mismatching_if_none_match_wins_over_a_recent_if_modified_since(launch, store, jpeg):
    target = launch(store)
    name = unique('photo.jpg')
    target.stored(name, jpeg)
    last_modified = target.fileget(name).headers['Last-Modified']
    answer = target.attack(lambda: target.fileget(name, headers={'If-None-Match': '"an-older-version"',
                                                                 'If-Modified-Since': last_modified}))
    assert (answer.status, answer.body) == (200, jpeg)


# === No room: a full disk, no inodes left ========================================================================

def test_an_upload_to_a_disk_already_full_is_507_and_leaves_nothing(fresh, tmp_path, small_disk):
    attachments = small_disk(tmp_path / 'full' / 'attachments', '1m')
    target = fresh(folder=tmp_path / 'full')
    fill_up(attachments / 'planted-filler')
    answer = target.attack(lambda: target.upload(unique('small.png'), png_bytes(10, 10)))   # below the write buffer
    assert (answer.status, answer.body.decode()) == (507, NO_ROOM)
    assert 'X-Timestamp' in answer.headers


def test_an_upload_that_fills_the_disk_is_507_and_the_room_is_free_again(fresh, tmp_path, small_disk):
    small_disk(tmp_path / 'small' / 'attachments', '1m')
    target = fresh(folder=tmp_path / 'small')
    answer = target.attack(lambda: target.upload(unique('scan.tif'), os.urandom(3 * MiB)))
    assert (answer.status, answer.body.decode()) == (507, NO_ROOM)
    assert target.upload(unique('small.png'), png_bytes(10, 10)).body == b'Ok.'


def test_a_thumbnail_asked_for_when_the_disk_has_no_inodes_left_is_507(fresh, tmp_path, small_disk):
    attachments = small_disk(tmp_path / 'few' / 'attachments', '8m', inodes=64)
    target = fresh(folder=tmp_path / 'few')
    target.stored('a.png', png_bytes(40, 30))
    planted = attachments / 'planted-inodes'
    planted.mkdir()
    use_every_inode(planted)
    answer = target.attack(lambda: target.thumbnail('a.png', 10))
    assert (answer.status, answer.body) == (507, b'The server has no room to make this thumbnail.')
    assert 'X-Timestamp' in answer.headers


def test_a_thumbnail_whose_output_finds_the_disk_full_is_507_and_made_once_there_is_room(fresh, tmp_path,
                                                                                          small_disk):
    attachments = small_disk(tmp_path / 'tight' / 'attachments', '16m')
    target = fresh(folder=tmp_path / 'tight')
    noise = make_image(tmp_path, 'plasma:', '1000x750', 'png')      # its 1000 px thumbnail: itself, 1-2 MB
    target.stored('noise.png', noise)
    filler = attachments / 'planted-filler'
    fill_up(filler)
    os.truncate(filler, filler.stat().st_size - 64 * 1024)          # room for the scratch folder, not the output
    answer = target.attack(lambda: target.thumbnail('noise.png', 1000))
    assert (answer.status, answer.body) == (507, b'The server has no room to make this thumbnail.')
    filler.unlink()
    again = target.thumbnail('noise.png', 1000)                     # not remembered as the file's failure
    assert again.status == 200 and again.body.startswith(b'\x89PNG')


# === Offload: names no header may carry ==========================================================================

@pytest.mark.parametrize('name', ['a\r\nX-Injected: 1.jpg', 'a\nb.jpg', 'a\x1bb.jpg'])
def test_apache_offload_of_a_name_with_a_control_character_is_served_by_the_server_itself(launch, name):
    target = launch(FILE_OFFLOAD='apache')
    name = unique(name)
    target.stored(name, b'\xff\xd8\xff bytes')
    answer = target.attack(lambda: target.fileget(name))      # GET /fileget?filename=a%0D%0AX-Injected...
    assert (answer.status, answer.body) == (200, b'\xff\xd8\xff bytes')
    assert 'X-Sendfile' not in answer.headers and 'X-Injected' not in answer.headers


# === Paste's own answers, before the application sees a request ==================================================

MALFORMED = {
    'a request line of one word': (b'GARBAGE\r\n\r\n', 400),
    'a request line of four words': (b'GET / HTTP/1.1 more\r\n\r\n', 400),
    'an unreadable HTTP version': (b'GET / HTTP/x.y\r\n\r\n', 400),
    'a header line over 64 KiB': (b'GET / HTTP/1.1\r\nX-Long: ' + b'a' * 70_000 + b'\r\n\r\n', 431),
    'over 100 header lines': (b'GET / HTTP/1.1\r\n' + b''.join(b'X-%d: 1\r\n' % i for i in range(120)) + b'\r\n',
                              431),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_pastes_own_error_answers_carry_x_timestamp_and_cors_and_no_traceback(launch, case):
    target = launch()
    request, expected = MALFORMED[case]
    before = int(time.time())
    answer = target.attack(lambda: raw_exchange(target.web.port, request))
    assert answer.status == expected
    assert before <= int(answer.headers['X-Timestamp']) <= time.time()
    assert answer.headers['Access-Control-Allow-Origin'] == '*'
    assert answer.headers['Content-Type'] == 'text/plain; charset=UTF-8'
    assert b'Traceback' not in answer.body and b'<' not in answer.body


def test_a_request_line_over_64_kib_is_414_with_x_timestamp(launch):
    target = launch()
    answer = target.attack(lambda: raw_exchange(target.web.port, b'GET /' + b'a' * 70_000 + b' HTTP/1.1\r\n\r\n'))
    assert (answer.status, answer.body) == (414, b'Request-URI Too Long.')
    assert 'X-Timestamp' in answer.headers


def test_a_method_with_nul_and_escape_reaches_the_access_log_escaped(launch):
    target = launch(ACCESS_LOG='true')
    marker = secrets.token_hex(4)
    answer = target.attack(lambda: raw_exchange(target.web.port, b'GET\x1b[2J\x00%s / HTTP/1.1\r\nHost: a\r\n'
                                                                 b'Connection: close\r\n\r\n' % marker.encode()))
    assert answer.status == 405
    assert wait_for(lambda: f'GET\\x1b[2J\\x00{marker} / 405 ' in target.web.output(), 10), target.web.output()[-500:]
    assert '\x1b' not in target.web.output() and '\x00' not in target.web.output()


# === Reading with REQUIRE_KEY_FOR_GET, and /static ===============================================================

def test_the_getfileref_url_of_a_thumbnail_with_require_key_for_get_serves_it_with_the_originals_token(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('a.jpg')
    target.stored(name, jpeg)
    made = target.fileget(name, 'T', scale=64, token=target.token(name))
    assert made.status == 200

    def static_thumbnail():
        url = ask(target.web, 'GET', '/getfileref?' + urlencode({'filename': name, 'coll': 'Fish', 'type': 'T',
                                                                 'scale': 64, 'token': target.token(name)}))
        return url, ask(target.web, 'GET', '/' + url.body.decode().split('/', 3)[3])
    url, answer = target.attack(static_thumbnail)
    assert url.status == 200
    assert (answer.status, answer.headers['Content-Type'], answer.body) == (200, 'image/jpeg', made.body)


@STORAGES
def test_static_answers_a_pdfs_thumbnail_with_an_image_type(launch, store, tmp_path):
    target = launch(store)
    name = unique('notebook.pdf')
    target.stored(name, pdf(tmp_path, TWO_PAGES))
    assert target.thumbnail(name, 64).status == 200
    answer = target.attack(lambda: ask(target.web, 'GET', '/static/thumbnails/' + quote(thumbnail_name(name, 64))))
    assert (answer.status, answer.headers['Content-Type'], answer.body[:8]) == (200, 'image/png', b'\x89PNG\r\n\x1a\n')


# === A token read with cannot write ==============================================================================

READ_WITH = b'This token was used to read the file: a change needs a token of its own (make a new one).'


def delete_with(target, name, token):
    """POST /filedelete as Specify sends it, with this token."""
    return ask(target.web, 'POST', '/filedelete', urlencode({'filename': name, 'coll': 'Fish', 'token': token}).encode(),
               {'Content-Type': 'application/x-www-form-urlencoded'})


def upload_with(target, name, data, token):
    content_type, body = multipart_body([('store', name), ('type', 'O'), ('coll', 'Fish'), ('token', token),
                                         ('file', 'blob', data)])
    return ask(target.web, 'POST', '/fileupload', body, {'Content-Type': content_type})


def read_token(target, name):
    """A token of this second's, the one a reader would be handed."""
    return make_token(target.key, name, int(time.time()))


def fresh_token(target, name, read):
    """A token Specify would mint for a write: valid, and not the one read with (a second before it)."""
    return make_token(target.key, name, int(read.rpartition(':')[2]) - 1)


READS = {'fileget': '/fileget?coll=Fish&type=O&filename={name}&token={token}',
         'static': '/static/originals/{name}?token={token}',
         'IIIF info.json': '/iiif/3/{name}/info.json?token={token}'}


@pytest.mark.parametrize('required', [True, False], ids=['reads need a token', 'reads need none'])
@pytest.mark.parametrize('read', READS)
def test_a_token_a_file_was_read_with_cannot_delete_it(launch, jpeg, read, required):
    target = launch(REQUIRE_KEY_FOR_GET='true') if required else launch()
    name = unique('read.jpg')
    target.stored(name, jpeg)
    token = read_token(target, name)
    assert ask(target.web, 'GET', READS[read].format(name=quote(name, safe=''), token=token)).status == 200
    assert delete_with(target, name, token)[::2] == (403, READ_WITH)


def test_a_token_of_its_own_deletes_a_file_that_was_read(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('read.jpg')
    target.stored(name, jpeg)
    token = read_token(target, name)
    assert target.fileget(name, token=token).status == 200
    assert delete_with(target, name, fresh_token(target, name, token))[::2] == (200, b'Ok.')


def test_a_token_a_file_was_read_with_cannot_replace_it(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('read.jpg')
    target.stored(name, jpeg)
    token = read_token(target, name)
    assert target.fileget(name, token=token).status == 200
    assert upload_with(target, name, b'replaced', token)[::2] == (403, READ_WITH)
    assert target.fileget(name, token=token).body == jpeg


def test_the_token_getfileref_writes_into_a_static_url_cannot_delete_the_file(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('portal.jpg')
    target.stored(name, jpeg)
    url = ask(target.web, 'GET', '/getfileref?' + urlencode({'filename': name, 'coll': 'Fish', 'type': 'O',
                                                             'token': read_token(target, name)}))
    token = url.body.decode().rpartition('token=')[2].replace('%3A', ':')
    assert delete_with(target, name, token)[::2] == (403, READ_WITH)


def test_a_token_that_wrote_a_file_still_reads_it(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('written.jpg')
    token = read_token(target, name)
    assert upload_with(target, name, jpeg, token)[::2] == (200, b'Ok.')
    assert target.fileget(name, token=token)[::2] == (200, jpeg)


# === What an answer that needed a token tells caches, and what the log keeps ========================================

@pytest.mark.parametrize('kind', ['O', 'T'])
def test_an_answer_that_needed_a_token_is_private_to_the_browser(launch, jpeg, kind):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('private.jpg')
    target.stored(name, jpeg)
    answer = target.fileget(name, kind, token=target.token(name), **({'scale': 64} if kind == 'T' else {}))
    assert (answer.status, answer.headers['Cache-Control'].split(',')[0]) == (200, 'private')


def test_a_static_answer_that_needed_a_token_is_private_to_the_browser(launch, jpeg):
    target = launch(REQUIRE_KEY_FOR_GET='true')
    name = unique('private.jpg')
    target.stored(name, jpeg)
    answer = ask(target.web, 'GET', f'/static/originals/{quote(name)}?token={target.token(name)}')
    assert (answer.status, answer.headers['Cache-Control']) == (200, 'private')


def test_a_thumbnail_that_needed_no_token_keeps_its_public_caching(launch, jpeg):
    target = launch()
    name = unique('public.jpg')
    target.stored(name, jpeg)
    assert 'private' not in (target.thumbnail(name).headers['Cache-Control'] or '')


def collection_identifier(coll, name):
    return server.iiif.spelling(coll, name)


@pytest.mark.parametrize('coll', ['Fish', 'Secret Birds'])
def test_without_a_token_an_iiif_identifier_answers_alike_for_a_known_and_an_unknown_collection(launch, coll):
    target = launch(COLLECTION_DIRS='{"Fish": "fish"}', REQUIRE_KEY_FOR_GET='true')
    answer = ask(target.web, 'GET', f'/iiif/3/{collection_identifier(coll, "a.jpg")}/info.json')
    assert (answer.status, answer.body) == (403, b'Missing token.')


def test_with_its_token_an_iiif_identifier_of_an_unknown_collection_is_404(launch):
    target = launch(COLLECTION_DIRS='{"Fish": "fish"}', REQUIRE_KEY_FOR_GET='true')
    answer = ask(target.web, 'GET', f'/iiif/3/{collection_identifier("Secret Birds", "a.jpg")}/info.json?'
                 f'token={target.token("a.jpg")}')
    assert (answer.status, answer.body) == (404, b'No such image.')


def test_a_viewer_grant_is_written_to_the_access_log_as_its_expiry_only(start, jpeg):
    web = start(REQUIRE_KEY_FOR_GET='true')
    head, body = upload_request('viewed.jpg', jpeg, extra='Connection: close\r\n')
    with connect(web) as uploading:
        uploading.sendall(head + body)
        assert statuses(read_all(uploading)) == [200]
    info = json.loads(web.request('GET', '/iiif/3/viewed.jpg/info.json?token=' + make_token(KEY, 'viewed.jpg'))[2])
    grant = re.search(r'/grant/([0-9]+)\.([0-9a-f]{32})/', info['id'])
    assert web.request('GET', f'/iiif/grant/{grant[1]}.{grant[2]}/3/viewed.jpg/info.json')[0] == 200
    assert wait_for(lambda: f'/iiif/grant/{grant[1]}.…/3/viewed.jpg/info.json 200' in web.output(), 5)
    assert grant[2] not in web.output()


def test_a_long_path_is_logged_and_echoed_cut_to_the_stated_length(start):
    web = start()
    path = '/' + 'x' * 60_000
    status, _headers, body = web.request('GET', path)
    assert (status, len(body.decode())) == (404, server.ECHOED_TEXT + 1)
    assert wait_for(lambda: '/' + 'x' * (server.LOGGED_PATH - 1) + '… 404' in web.output(), 5)
    assert 'x' * (server.LOGGED_PATH + 1) not in web.output()


# === Specify 6's own uploads ======================================================================================

def test_specify6_uploads_to_a_collection_named_in_iso_8859_1(launch, jpeg):
    target = launch(COLLECTION_DIRS='{"Fish": "fish", "Colección Peces": "peces"}')
    name = unique('sp6123.att.jpg')
    content_type, body = specify6_body([('store', name), ('type', 'O'), ('coll', 'Colección Peces'),
                                        ('token', target.token(name)), ('disp', 'Ictiología'), ('div', 'Zoología'),
                                        ('inst', 'Museo')], 'foto.jpg', jpeg)
    answer = target.attack(lambda: ask(target.web, 'POST', '/fileupload', body, {'Content-Type': content_type}))
    assert (answer.status, answer.body) == (200, b'Ok.')
    assert (target.attachments / 'peces' / 'originals' / name).read_bytes() == jpeg


# === IIIF: hostile image requests (issue 14) ======================================================================
# Every answer is the specification's: 200, 400 (a bad parameter), 404 (no such image; 2.1 also for a size over
# the limits) or 501, or the front's own 4xx/503; the harness holds each to no 500 and its other promises.

@pytest.fixture(scope='module')
def herbarium_sheet(tmp_path_factory):
    """A 7000x5000 JPEG: 35 MP, the size of a scanned herbarium sheet."""
    return make_image(tmp_path_factory.mktemp('sheet'), 'gradient:red-blue', '7000x5000', 'jpg')


@pytest.fixture(scope='module')
def photo_2mp(tmp_path_factory):
    """A 2000x1400 JPEG."""
    return make_image(tmp_path_factory.mktemp('photo'), 'gradient:green-yellow', '2000x1400', 'jpg')


def iiif_answers(target, paths, name):
    """{path: Answer} of GET /iiif{path}, `{}` in each path standing for the identifier `name`."""
    return {path: ask(target.web, 'GET', '/iiif' + path.format(quote(name, safe=''))) for path in paths}


def statuses_of(answers):
    return {path: answer.status for path, answer in answers.items()}


def slowest(answers):
    return max(answer.seconds for answer in answers.values())


HUGE_SIZES = {'/3/{}/full/999999999,/0/default.jpg': 400, '/3/{}/full/,999999999/0/default.jpg': 400,
              '/3/{}/full/999999999,999999999/0/default.jpg': 400, '/3/{}/full/9999999999,/0/default.jpg': 400,
              '/3/{}/full/^999999999,/0/default.jpg': 400, '/3/{}/full/^,999999999/0/default.jpg': 400,
              '/3/{}/full/^999999999,999999999/0/default.jpg': 400, '/3/{}/full/^pct:999999999/0/default.jpg': 400,
              '/3/{}/full/pct:999999999/0/default.jpg': 400, '/3/{}/0,0,1,1/^4097,/0/default.jpg': 400,
              '/2/{}/full/999999999,/0/default.jpg': 404, '/2/{}/full/pct:999999999/0/default.jpg': 404,
              '/2/{}/full/^max/0/default.jpg': 400}


def test_huge_iiif_sizes_on_a_35_mp_sheet_are_refused_at_once_and_upscaling_to_max_is_fitted_within_the_limit(
        launch, herbarium_sheet, tmp_path):
    target = launch()
    name = unique('sheet.jpg')
    target.stored(name, herbarium_sheet)
    assert iiif_answers(target, ['/3/{}/info.json'], name)['/3/{}/info.json'].status == 200   # viewed: its pyramid
    upscaled = '/3/{}/full/^max/0/default.jpg'
    answers = target.attack(lambda: iiif_answers(target, [*HUGE_SIZES, upscaled], name))  # GET /iiif/3/sheet.jpg/…
    assert statuses_of(answers) == {**HUGE_SIZES, upscaled: 200}
    assert image_info(answers.pop(upscaled).body, tmp_path) == ('JPEG', 4096, 2926)      # IIIF_MAX_SIZE
    assert slowest(answers) < 1


REGIONS = {'-1,0,10,10': 400, '0,-1,10,10': 400, '0,0,-10,10': 400, '0,0,10,-10': 400, 'pct:-1,0,10,10': 400,
           '999999999,0,10,10': 400, '0,999999999,10,10': 400, '9999999999,0,10,10': 400, 'pct:100,0,10,10': 400,
           'pct:0,0,1e9,1e9': 400, 'pct:0,0,0.00000000001,1': 400, '0,0,0,0': 400, '2000,1400,1,1': 400,
           '0,0,999999999,999999999': 200, '1999,1399,999999999,999999999': 200,
           'pct:0,0,999999999,999999999': 200, 'pct:99.9999999999,0,999999999,1': 200}


def test_negative_or_overflowing_regions_are_400_and_oversized_ones_cropped_at_the_edge(launch, photo_2mp, tmp_path):
    target = launch()
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    paths = {f'/3/{{}}/{region}/!100,100/0/default.jpg': status for region, status in REGIONS.items()}
    answers = target.attack(lambda: iiif_answers(target, paths, name))
    assert statuses_of(answers) == paths
    assert {path: image_info(answer.body, tmp_path)[1:] for path, answer in answers.items()
            if answer.status == 200} == {'/3/{}/0,0,999999999,999999999/!100,100/0/default.jpg': (100, 70),
                                         '/3/{}/1999,1399,999999999,999999999/!100,100/0/default.jpg': (1, 1),
                                         '/3/{}/pct:0,0,999999999,999999999/!100,100/0/default.jpg': (100, 70),
                                         '/3/{}/pct:99.9999999999,0,999999999,1/!100,100/0/default.jpg': (1, 14)}
    assert slowest(answers) < 5


ROTATIONS = ['NaN', 'nan', '!NaN', 'inf', '-inf', 'Infinity', '-0', '%2B0', '-90', '1e9', '1E2', '1000000000',
             '360.0000000001', '0x10', '!!90', '%2090', '90%20', '%D9%A9%D9%A0', '9%C2%B2']


@pytest.mark.parametrize('version', ['3', '2'])
def test_rotations_that_are_not_plain_decimals_from_0_to_360_are_400(launch, photo_2mp, version):
    target = launch()
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    paths = [f'/{version}/{{}}/full/!100,100/{rotation}/default.jpg' for rotation in ROTATIONS + ['360', '!0.5']]
    answers = target.attack(lambda: iiif_answers(target, paths, name))
    assert statuses_of(answers) == {**dict.fromkeys(paths[:-2], 400), **dict.fromkeys(paths[-2:], 200)}
    assert slowest(answers) < 5


def identifier_attacks(name):
    """Identifiers (as written in the URL) that name no original: percent-encoded dots, backslashes, NUL, double
    encoding, overlong UTF-8, the server's temporary names, names too long, and what the front refuses (414)."""
    return {'%2e%2e': 404, '%2E%2E%2F%2E%2E%2Fsettings.py': 404, '..%2F..%2Fserver.py': 404,
            '%2e%2e%2foriginals%2f' + name: 404, name + '%00': 404, '%00': 404,
            '%5C..%5C' + name: 404, '%252e%252e%252f' + name: 404, '%C0%AE%C0%AE': 400,
            quote(TEMP_PREFIX) + name: 404, 'a' * 252 + '.jpg': 404, '%C3%A9' * 126 + '.jpg': 404,
            'a' * 60_000: 404, 'a' * 70_000: 414}


def test_identifiers_with_encoded_dots_nul_or_too_long_name_no_image(launch, photo_2mp):
    target = launch()
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    paths = {f'/iiif/3/{identifier}{rest}': status for identifier, status in identifier_attacks(name).items()
             for rest in ('/info.json', '/full/max/0/default.jpg')}
    answers = target.attack(lambda: {path: ask(target.web, 'GET', path) for path in paths})
    assert {path[:80]: answer.status for path, answer in answers.items()} == {
        path[:80]: status for path, status in paths.items()}
    assert slowest(answers) < 2


def test_an_identifier_with_a_percent_encoded_slash_names_no_image(launch, photo_2mp):
    target = launch()
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    paths = [f'/iiif/3/{name}%2Finfo.json', f'/iiif/3/x%2F..%2F{name}/info.json',
             f'/iiif/3/{name}%2Ffull%2Fmax%2F0%2Fdefault.jpg', f'/iiif/3/x%2F..%2F{name}/full/max/0/default.jpg']
    answers = target.attack(lambda: {path: ask(target.web, 'GET', path) for path in paths})
    assert statuses_of(answers) == dict.fromkeys(paths, 404)


FLOOD = 5000                    # distinct regions one client asks for
FLOOD_THREADS = 4               # the client's kept-alive connections, each asking as soon as answered


def flood_region(index):
    """A region of the 2000x1400 photo no other index asks for; every tenth lies outside it (a 400)."""
    width, height = 8 + index % 64, 8 + index // 64
    x = 2000 + index if index % 10 == 9 else (index * 37) % 1990
    return f'{x},{(index * 53) % 1390},{width},{height}'


def flood(port, name, count, threads):
    """Answers to `count` distinct region requests sent by one client (127.0.0.2) on `threads` kept-alive
    connections, each the next as soon as the last is answered, in the order asked."""
    indexes, lock, answers = iter(range(count)), threading.Lock(), {}

    def ask_in_turn():
        connection = http.client.HTTPConnection('127.0.0.1', port, timeout=60, source_address=('127.0.0.2', 0))
        try:
            while (index := next(indexes, None)) is not None:
                started = time.monotonic()
                connection.request('GET', f'/iiif/3/{quote(name)}/{flood_region(index)}/!64,64/0/default.jpg')
                answer = connection.getresponse()
                body = answer.read()
                with lock:
                    answers[index] = Answer(answer.status, answer.headers, body, time.monotonic() - started)
        finally:
            connection.close()
    askers = [Background(ask_in_turn) for _ in range(threads)]
    for asker in askers:
        asker.joined(120)
    return [answers[index] for index in range(count)]


def stored_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob('*') if path.is_file())


def test_5000_distinct_regions_from_one_client_are_answered_at_once_and_leave_no_unbounded_files(launch, photo_2mp):
    target = launch(MAX_REQUESTS_PER_CLIENT='2')       # the client's share: beyond it, 503 at once
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    before, started = stored_bytes(target.attachments), time.monotonic()
    answers = target.attack(lambda: flood(target.web.port, name, FLOOD, FLOOD_THREADS))
    assert time.monotonic() - started < 60
    outside = [index % 10 == 9 for index in range(FLOOD)]
    assert {(answer.status, beyond) for answer, beyond in zip(answers, outside)} <= {
        (200, False), (400, True), (503, False), (503, True)}
    assert all(answer.body.startswith(b'\xff\xd8') for answer in answers if answer.status == 200)
    assert max(answer.seconds for answer in answers if answer.status != 200) < 2
    assert max(answer.seconds for answer in answers if answer.status == 200) < 10
    assert stored_bytes(target.attachments) - before < 8 * MiB


def test_two_tiles_of_a_35_mp_sheet_asked_at_once_stay_within_the_memory_bound(launch, herbarium_sheet):
    target = launch()
    name = unique('sheet.jpg')
    target.stored(name, herbarium_sheet)
    tiles = [f'/3/{{}}/{x},0,512,512/512,/0/default.jpg' for x in (0, 512)]

    def both_at_once():
        asking = [Background(lambda tile=tile: iiif_answers(target, [tile], name)) for tile in tiles]
        return [one.joined(60) for one in asking]
    answers = target.attack(both_at_once)
    assert [answer.status for one in answers for answer in one.values()] == [200, 200]


def claiming(jpeg_bytes, width, height):
    """The JPEG with its frame header (SOFn) claiming width x height; its data stays that of the real image."""
    at = 2
    while not (0xC0 <= jpeg_bytes[at + 1] <= 0xCF and jpeg_bytes[at + 1] not in (0xC4, 0xC8, 0xCC)):
        at += 2 + struct.unpack('>H', jpeg_bytes[at + 2:at + 4])[0]
    return jpeg_bytes[:at + 5] + struct.pack('>HH', height, width) + jpeg_bytes[at + 9:]


TILES = [f'/3/{{}}/{x},{y},{min(512, 2000 - x)},{min(512, 1400 - y)}/{min(512, 2000 - x)},/0/default.jpg'
         for y in (0, 512, 1024) for x in (0, 512, 1024, 1536)]       # a 2000x1400 image's tiles at full size


def test_a_jpeg_header_claiming_60000x60000_is_refused_404_at_once_on_every_tile(launch, jpeg):
    target = launch()
    name = unique('claims.jpg')
    target.stored(name, claiming(jpeg, 60_000, 60_000))
    paths = ['/3/{}/info.json', '/2/{}/info.json'] + TILES
    answers = target.attack(lambda: iiif_answers(target, paths, name))
    assert statuses_of(answers) == dict.fromkeys(paths, 404)
    assert slowest(answers) < 1


def test_the_tiles_of_a_truncated_jpeg_are_a_clean_refusal_each_time(launch, photo_2mp):
    target = launch()
    name = unique('truncated.jpg')
    target.stored(name, photo_2mp[:len(photo_2mp) * 3 // 10])
    answers = target.attack(lambda: iiif_answers(target, TILES, name))
    assert {answer.status >= 400 for answer in answers.values()} == {True}
    assert len({(answer.status, answer.body) for answer in answers.values()}) == 1
    assert slowest(answers) < 2


def test_a_small_jpeg_claiming_48_mp_is_viewed_within_the_memory_bound_from_one_pyramid(launch, jpeg):
    """libjpeg only warns of such data (libvips would refuse it only with fail_on=warning, which also refuses
    real cameras' files with stray bytes): its pyramid is built and stored within bounds, grey past the data."""
    target = launch()
    name = unique('claims.jpg')
    target.stored(name, claiming(jpeg, 8000, 6000))
    answers = target.attack(lambda: iiif_answers(target, TILES[:2] + ['/3/{}/info.json'], name))
    assert {answer.status for answer in answers.values()} == {200}
    assert (target.attachments / 'thumbnails' / pyramid_name(name)).is_file()


def noise_png(width, height):
    """An RGB PNG of noise, made without ImageMagick (each row the first one, shifted)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    row = os.urandom(3 * width)
    rows = b''.join(b'\0' + row[3 * (y % 97):] + row[:3 * (y % 97)] for y in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows, 1)) + chunk(b'IEND', b''))


def test_a_corrupt_originals_failure_is_not_retried_on_every_tile(launch):
    target = launch()
    name = unique('cut.png')
    whole = noise_png(4000, 3000)
    target.stored(name, whole[:len(whole) // 2])

    def spending(paths):
        """(answers, CPU seconds the server and its children spent on them)."""
        spent = cpu_seconds(target.pid)
        return iiif_answers(target, paths, name), cpu_seconds(target.pid) - spent

    def every_tile_twice():
        return spending(TILES[:1]), spending(TILES[1:]), spending(TILES)
    (first, failing), *later = target.attack(every_tile_twice)
    assert statuses_of(first) == {TILES[0]: 404}
    assert [statuses_of(answers) for answers, _spent in later] == [dict.fromkeys(TILES[1:], 404),
                                                                   dict.fromkeys(TILES, 404)]
    assert sum(spent for _answers, spent in later) < 0.25 * failing * (2 * len(TILES) - 1)   # a quarter each


def offered_answers(info):
    """The path (after the identifier) of every tile and size an info.json offers."""
    entry = info['tiles'][0]
    tiles = test_iiif_grammar.tile_requests(info['width'], info['height'], entry['width'],
                                            entry.get('height', entry['width']), entry['scaleFactors'])
    return ([f'{x},{y},{w},{h}/{sw},{sh}/0/default.jpg' for (x, y, w, h), (sw, sh) in tiles]
            + [f"full/{size['width']},{size['height']}/0/default.jpg" for size in info['sizes']])


def test_viewing_every_tile_and_size_grows_the_cache_beyond_the_originals_only_until_the_bound_is_applied(fresh,
                                                                                                          photo_2mp):
    target = fresh()                                         # THUMBNAIL_CACHE_MAX_BYTES: its default, '100%'
    name = unique('photo.jpg')
    target.stored(name, photo_2mp)
    identifier = quote(name, safe='')
    info = json.loads(ask(target.web, 'GET', f'/iiif/3/{identifier}/info.json').body)
    answers = target.attack(lambda: [ask(target.web, 'GET', f'/iiif/3/{identifier}/{path}')
                                     for path in offered_answers(info)])
    assert {answer.status for answer in answers} == {200}
    originals = stored_bytes(target.attachments / 'originals')
    assert stored_bytes(target.attachments / 'thumbnails') > 2 * originals         # what viewing alone leaves
    assert derivatives.main(['prune', '--nice', '0'], environ={'BASE_DIR': str(target.attachments)}) == 0
    assert stored_bytes(target.attachments / 'thumbnails') <= originals * 9 // 10


# === Start-up ====================================================================================================

def test_an_empty_key_file_stops_the_start_with_one_line_naming_it(tmp_path):
    attachments, work = tmp_path / 'attachments', tmp_path / 'cwd'
    attachments.mkdir()
    work.mkdir()
    (attachments / KEY_FILE).write_text('\n')
    environment = {name: value for name, value in os.environ.items() if name not in ('KEY', 'ASSET_SERVER_KEY')}
    started = subprocess.run([sys.executable, SERVER_SCRIPT], cwd=work, capture_output=True, timeout=60,
                             env={**environment, 'BASE_DIR': str(attachments), 'HOST': '127.0.0.1', 'PORT': '1'})
    lines = (started.stdout + started.stderr).decode().splitlines()
    assert started.returncode == 1
    assert lines == [f'web asset server cannot start: the key file {attachments / KEY_FILE} is empty: put the '
                     'attachment key Specify uses into it, or remove the file to have a new key made (then give '
                     'Specify the new key)']
    assert (attachments / KEY_FILE).read_text() == '\n'


def test_upload_temporaries_a_crash_left_over_an_hour_ago_are_swept_at_start_on_s3(fresh, tmp_path):
    attachments = tmp_path / 'swept' / 'attachments'
    attachments.mkdir(parents=True)
    for name in ('old.part', 'fresh.part'):
        (attachments / (TEMP_PREFIX + name)).write_bytes(b'staged')
    two_hours_ago = time.time() - 7200
    os.utime(attachments / (TEMP_PREFIX + 'old.part'), (two_hours_ago, two_hours_ago))
    fresh('s3', folder=tmp_path / 'swept')
    assert sorted(os.listdir(attachments)) == sorted([TEMP_PREFIX + 'fresh.part', KEY_FILE, 'audit.jsonl'])


# === Slow and greedy clients: request heads, bodies, connection caps, keep-alive, lingering close ===============
# These run on plain servers (conftest's RunningServer) of their own: each needs settings of its own, and the
# attacks are on connections, before any application work.

@pytest.fixture
def start(tmp_path):
    """start(**settings) runs a plain server for this test (no harness: these attacks are on connections, and
    each needs settings of its own); all are stopped after it."""
    running = []

    def launch(**env):
        web = RunningServer(tmp_path / f'attachments-{len(running)}', tmp_path / f'server-{len(running)}.log',
                            PREGENERATE_SCALE='none', **env)
        running.append(web)
        return web
    yield launch
    for web in running:
        web.stop()


def connect(web, source='127.0.0.1'):
    """A raw connection to the server from one loopback address (any of 127/8 reaches it)."""
    return socket.create_connection(('127.0.0.1', web.port), timeout=30, source_address=(source, 0))


def answer_of(connection):
    """(status, headers, body) read until the server closes."""
    received = b''
    while chunk := connection.recv(65536):
        received += chunk
    head, _, body = received.partition(b'\r\n\r\n')
    status_line, *lines = head.decode('latin-1').split('\r\n')
    return int(status_line.split()[1]), dict(line.split(': ', 1) for line in lines), body


def get(connection, path='/'):
    connection.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
    return answer_of(connection)


def upload_request(name, data, extra=''):
    """The head and body of a Specify upload of `data` as `name`, with `extra` header lines."""
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', make_token(KEY, name))])
    head = (f'POST /fileupload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}'
            f'Content-Length: {len(body)}\r\n\r\n').encode()
    return head, body


def send_paced(connection, data, rate, stop):
    """Send `data` at about `rate` bytes a second in 1/20 s steps, until done, stopped or refused."""
    step, started, sent = max(1, rate // 20), time.monotonic(), 0
    try:
        while sent < len(data) and not stop.is_set():
            connection.sendall(data[sent:sent + step])
            sent += step
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                stop.wait(ahead)
    except OSError:
        pass


def in_background(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def staged(web):
    """Uploads in progress: the server's temporary files."""
    return [path for path in web.base_dir.rglob(TEMP_PREFIX + '*') if path.is_file()]


# --- Request heads -----------------------------------------------------------------------------

def test_clients_trickling_request_heads_hold_no_thread_so_others_are_served_at_once(start):
    web = start(THREADS='5')
    stop = threading.Event()
    tricklers = [connect(web) for _ in range(40)]
    try:
        for connection in tricklers:
            in_background(send_paced, connection, b'GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'a' * 1000, 2, stop)
        started = time.monotonic()
        assert web.request('GET', '/health', timeout=20)[0] == 200
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        for connection in tricklers:
            connection.close()


def test_a_head_still_incomplete_after_request_head_timeout_is_answered_408_and_closed(start):
    web = start(REQUEST_HEAD_TIMEOUT='2')
    stop = threading.Event()
    started = time.monotonic()          # before connecting: the server counts from when it accepts
    with connect(web) as connection:
        in_background(send_paced, connection, b'GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'a' * 1000, 5, stop)
        status, headers, body = answer_of(connection)
        stop.set()
    assert (status, body) == (408, b'Request Timeout.')
    assert 'X-Timestamp' in headers
    assert 2 <= time.monotonic() - started < 6


def test_empty_lines_before_a_request_line_are_ignored(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        assert answer_of(connection)[0] == 200


def test_a_path_with_c1_controls_and_line_separators_is_escaped_in_the_access_log(start):
    web = start()
    with connect(web) as connection:
        get(connection, '/a%C2%85b%E2%80%A8c')           # U+0085 (NEL) and U+2028 split lines for str.splitlines
    assert wait_for(lambda: 'GET /a\\x85b\\u2028c 404' in web.output(), 10), web.output()[-500:]


def test_a_path_that_is_not_utf8_is_400_rather_than_routed_without_its_bad_bytes(start):
    web = start()
    with connect(web) as connection:
        status, _, body = get(connection, '/fileget%FF?filename=a.jpg')
    assert (status, body) == (400, b'The path is not UTF-8.')


def test_a_path_with_a_character_beyond_latin_1_is_routed_not_a_500(start):
    web = start()
    with connect(web) as connection:
        assert get(connection, '/a%E2%80%A8c')[0] == 404


def test_static_serves_a_file_whose_name_has_a_non_ascii_letter(start, jpeg):
    web = start()
    head, body = upload_request('Colección.jpg', jpeg, 'Connection: close\r\n')
    with connect(web) as connection:
        connection.sendall(head + body)
        assert answer_of(connection)[2] == b'Ok.'
    assert web.request('GET', '/static/originals/Colecci%C3%B3n.jpg')[::2] == (200, jpeg)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer_after_request_head_timeout(start):
    web = start(REQUEST_HEAD_TIMEOUT='2')
    started = time.monotonic()          # before connecting: the server counts from when it accepts
    with connect(web) as connection:
        assert connection.recv(1024) == b''
    assert 2 <= time.monotonic() - started < 6


def test_the_head_timeout_counts_from_the_connection_not_from_the_last_byte(start):
    web = start(REQUEST_HEAD_TIMEOUT='2', SOCKET_TIMEOUT='60')
    stop = threading.Event()
    with connect(web) as connection:
        started = time.monotonic()
        in_background(send_paced, connection, b'GET / HTTP/1.1\r\n' + b'X-A: b\r\n' * 100, 20, stop)
        status = answer_of(connection)[0]
        stop.set()
    assert status == 408 and time.monotonic() - started < 6


# --- Kept-alive connections --------------------------------------------------------------------

def test_idle_kept_alive_connections_hold_no_thread_and_each_serves_its_next_request(start):
    web = start(THREADS='5')
    clients = [http.client.HTTPConnection('127.0.0.1', web.port, timeout=10) for _ in range(20)]
    for client in clients:
        client.request('GET', '/health')
        assert json.loads(client.getresponse().read()) == {'storage': 'ok', 'thumbnails': 'ok'}
    sockets = [client.sock for client in clients]
    assert None not in sockets                    # still open after the first answer
    started = time.monotonic()
    assert web.request('GET', '/health', timeout=20)[0] == 200
    assert time.monotonic() - started < 2
    for client, first in zip(clients, sockets):
        client.request('GET', '/health')
        assert client.getresponse().status == 200 and client.sock is first
        client.close()


def test_an_idle_kept_alive_connection_is_closed_after_request_head_timeout(start):
    web = start(REQUEST_HEAD_TIMEOUT='2')
    with connect(web) as connection:
        connection.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
        answered = time.monotonic()
        received = b''
        while chunk := connection.recv(65536):
            received += chunk
    assert received.startswith(b'HTTP/1.1 200 ') and received.endswith(b'"thumbnails": "ok"}')
    assert 2 <= time.monotonic() - answered < 6


def test_pipelined_requests_are_answered_in_order_on_one_connection(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n'
                           b'GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        received = b''
        while chunk := connection.recv(65536):
            received += chunk
    assert re.findall(rb'HTTP/1\.1 (\d{3}) ', received) == [b'200', b'404']


def test_a_body_the_server_did_not_read_is_never_taken_for_a_next_request(start):
    web = start()
    smuggled = b'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n'
    with connect(web) as connection:
        connection.sendall(b'POST /filedelete HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n'
                           b'Content-Length: %d\r\n\r\n' % len(smuggled) + smuggled)
        received = b''
        while chunk := connection.recv(65536):
            received += chunk
    assert re.findall(rb'HTTP/1\.1 (\d{3}) ', received) == [b'403'] and '/smuggled' not in web.output()


# --- Request bodies ----------------------------------------------------------------------------

def test_an_upload_at_1_mbit_per_second_succeeds_past_the_grace_with_the_default_minimum_rate(start, jpeg):
    web = start(REQUEST_BODY_GRACE='1')
    data = jpeg + bytes(375_000 - len(jpeg))            # 3 s at 125 000 bytes a second
    head, body = upload_request('modem.jpg', data, 'Connection: close\r\n')
    with connect(web) as connection:
        connection.sendall(head)
        send_paced(connection, body, 125_000, threading.Event())
        status, _, answer = answer_of(connection)
    assert (status, answer) == (200, b'Ok.')
    assert web.request('GET', '/fileget?' + 'coll=Fish&type=O&filename=modem.jpg')[2] == data


def test_an_upload_slower_than_request_body_min_rate_is_cut_off_with_408_and_nothing_kept(start, jpeg):
    web = start(REQUEST_BODY_GRACE='1', REQUEST_BODY_MIN_RATE='4096')
    head, body = upload_request('trickle.jpg', jpeg + bytes(200_000))
    stop = threading.Event()
    with connect(web) as connection:
        started = time.monotonic()
        connection.sendall(head)
        in_background(send_paced, connection, body, 1024, stop)
        status, _, answer = answer_of(connection)
        stop.set()
    assert (status, answer) == (408, b'The upload arrived too slowly.')
    assert time.monotonic() - started < 10
    assert wait_for(lambda: staged(web) == [], 10)
    assert web.request('GET', '/fileget?coll=Fish&type=O&filename=trickle.jpg')[0] == 404


# --- Connection caps ---------------------------------------------------------------------------

@contextlib.contextmanager
def held_open(connections):
    """The connections, closed when the test is done with them."""
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


def connections_opened(web, count):
    """Up to `count` connections from 127.0.0.1 (those the server refused at once left out)."""
    opened = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            opened.append(connect(web))
    return opened


def test_connections_beyond_max_connections_per_client_are_answered_503_with_retry_after(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='3')
    with held_open([connect(web) for _ in range(3)]):
        with connect(web) as extra:
            status, headers, body = get(extra)
        assert (status, headers['Retry-After'], body) == (503, '5', b'Service Unavailable.')
        with connect(web, source='127.0.0.2') as other:
            assert get(other)[0] == 200


def test_a_client_under_its_connection_cap_again_is_served(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='3')
    held = [connect(web) for _ in range(3)]
    held.pop().close()
    with held_open(held):
        assert wait_for(lambda: get(connect(web))[0] == 200, 10)


def test_a_flood_of_connections_from_one_address_keeps_the_servers_descriptors_bounded(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='2')
    baseline = len(os.listdir(f'/proc/{web.process.pid}/fd'))
    with held_open(connections_opened(web, 400)):
        bound = baseline + 2 + front.REFUSALS_LINGERING + 4          # well before refusals stop lingering
        assert wait_for(lambda: len(os.listdir(f'/proc/{web.process.pid}/fd')) <= bound,
                        front.LINGER_QUIET_SECONDS - 2)
        with connect(web, source='127.0.0.2') as other:
            assert get(other)[0] == 200


def test_connections_beyond_max_connections_are_answered_503_whoever_opens_them(start):
    web = start(MAX_CONNECTIONS='4', MAX_CONNECTIONS_PER_CLIENT='50')
    with held_open([connect(web, source=f'127.0.0.{2 + i}') for i in range(4)]):
        with connect(web, source='127.0.0.9') as extra:
            assert get(extra)[0] == 503
    assert wait_for(lambda: get(connect(web, source='127.0.0.9'))[0] == 200, 10)


def hold_requests(web, count, source='127.0.0.1', forwarded_for=None):
    """`count` uploads in progress (their bodies still arriving slowly) from one address."""
    stop, held = threading.Event(), []
    for index in range(count):
        head, body = upload_request(f'held{index}.jpg', b'\xff\xd8' + bytes(400_000))
        if forwarded_for:
            head = head.replace(b'Host: x\r\n', f'Host: x\r\nX-Forwarded-For: {forwarded_for}\r\n'.encode())
        connection = connect(web, source)
        connection.sendall(head + body[:1000])
        in_background(send_paced, connection, body[1000:], 20_000, stop)
        held.append(connection)
    return stop, held


def release(stop, held):
    stop.set()
    for connection in held:
        connection.close()


def test_requests_beyond_max_requests_per_client_in_progress_are_answered_503_and_others_served(start):
    web = start(MAX_REQUESTS_PER_CLIENT='2')
    stop, held = hold_requests(web, 2)
    try:
        assert wait_for(lambda: len(staged(web)) == 2, 10)
        with connect(web) as extra:
            status, headers, _ = get(extra, '/health')
        assert (status, headers['Retry-After']) == (503, '1')
        with connect(web, source='127.0.0.2') as other:
            assert get(other, '/health')[0] == 200
    finally:
        release(stop, held)


def test_slow_uploads_from_two_clients_leave_threads_for_health(start):
    web = start(THREADS='7')                             # two threads for requests that hold one long
    stops = [hold_requests(web, 4, source) for source in ('127.0.0.1', '127.0.0.2')]
    try:
        assert wait_for(lambda: len(staged(web)) == 2, 10)
        for _ in range(3):
            health = ask(web, 'GET', '/health', source='127.0.0.3', timeout=8)
            assert (health.status, health.seconds < BYSTANDER_SECONDS) == (200, True), health
        assert len(staged(web)) == 2                     # the others wait without a thread
    finally:
        for stop, held in stops:
            release(stop, held)


def test_an_upload_waiting_for_a_thread_is_let_in_when_one_is_free_and_stored(start, jpeg):
    web = start(THREADS='6')                             # one thread for requests that hold one long
    stop, held = hold_requests(web, 1, '127.0.0.2')
    head, body = upload_request('waited.jpg', jpeg, extra='Connection: close\r\n')
    with connect(web, '127.0.0.3') as uploading:
        try:
            assert wait_for(lambda: len(staged(web)) == 1, 10)
            uploading.sendall(head + body)
            waiting = Background(lambda: answer_of(uploading))
            time.sleep(1)
            assert waiting.running() and len(staged(web)) == 1
            release(stop, held)
            assert waiting.joined(30)[::2] == (200, b'Ok.')
        finally:
            release(stop, held)


@pytest.mark.parametrize('head, kind', [
    (b'POST /fileupload HTTP/1.1\r\nContent-Length: 5000\r\n\r\n', 'body'),
    (b'POST /filedelete HTTP/1.1\r\ncontent-length:  12\r\n\r\n', 'body'),
    (b'POST /fileupload HTTP/1.1\r\nContent-Length: 0\r\n\r\n', None),
    (b'GET /health HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n', None),
    (b'GET /fileget?type=T&filename=a.jpg HTTP/1.1\r\n\r\n', 'conversion')])
def test_requests_with_a_body_wait_their_turn_as_conversions_do(head, kind):
    assert server.waits_its_turn(head) == kind


def test_the_waiting_room_keeps_each_kind_within_its_budget_and_all_within_the_total():
    room = WaitingRoom(lambda head: True, {'conversion': 2, 'body': 3}, wait=60, total=3)
    conversions = [types.SimpleNamespace(client=f'c{i}', kind='conversion') for i in range(3)]
    upload = types.SimpleNamespace(client='u', kind='body')
    assert [room.enter(connection) for connection in conversions] == [True, True, False]
    assert room.enter(upload) is True                   # the total's last thread
    assert room.enter(types.SimpleNamespace(client='v', kind='body')) is False
    assert [connection.client for connection in room.leave('u', 'body')] == ['v']   # not the third conversion


def test_no_client_holds_more_than_half_of_a_kinds_threads_though_the_total_is_larger():
    room = WaitingRoom(lambda head: True, {'conversion': 4, 'body': 10}, wait=60, total=10)
    flood = [types.SimpleNamespace(client='flood', kind='conversion') for _ in range(4)]
    assert [room.enter(connection) for connection in flood] == [True, True, False, False]
    assert room.enter(types.SimpleNamespace(client='bystander', kind='conversion')) is True


@contextlib.contextmanager
def one_upload_held(web, forwarded_for):
    """One upload in progress from 127.0.0.1, through a proxy naming `forwarded_for`, while the block runs."""
    stop, held = hold_requests(web, 1, forwarded_for=forwarded_for)
    try:
        assert wait_for(lambda: len(staged(web)) == 1, 10)
        yield
    finally:
        release(stop, held)


def test_behind_a_trusted_proxy_requests_are_counted_per_forwarded_client_and_logged_under_it(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1', TRUST_PROXY_HEADERS='true')
    with one_upload_held(web, '203.0.113.7, 198.51.100.1'):
        for forwarded, expected in (('198.51.100.1', 503), ('198.51.100.2', 200)):
            with connect(web) as connection:
                connection.sendall(f'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                   f'X-Forwarded-For: {forwarded}\r\n\r\n'.encode())
                assert answer_of(connection)[0] == expected
        assert wait_for(lambda: '198.51.100.2 GET /health 200' in web.output(), 10)


# --- Behind the proxies institutions run (TRUSTED_PROXIES) ------------------------------------------

def request_as(web, client=None, header='X-Forwarded-For', path='/health', source='127.0.0.1'):
    """One request from `source` whose proxy header names `client`: the answer's status."""
    named = f'{header}: {client}\r\n' if client else ''
    with connect(web, source) as connection:
        connection.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{named}\r\n'.encode())
        return answer_of(connection)[0]


def test_by_default_a_loopback_proxy_is_trusted_to_name_each_client_for_its_share(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1')
    with one_upload_held(web, '198.51.100.1'):
        assert (request_as(web, '198.51.100.1'), request_as(web, '198.51.100.2')) == (503, 200)


def test_x_real_ip_names_the_client_when_there_is_no_x_forwarded_for(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1')
    with one_upload_held(web, '198.51.100.1'):
        assert [request_as(web, client, 'X-Real-IP') for client in ('198.51.100.1', '198.51.100.2')] == [503, 200]


def test_a_peer_outside_trusted_proxies_cannot_name_another_client_to_escape_its_share(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1', TRUSTED_PROXIES='10.0.0.0/8')
    with one_upload_held(web, '198.51.100.1'):
        assert request_as(web, '198.51.100.2') == 503                 # still counted as 127.0.0.1
        assert request_as(web, '198.51.100.2', source='127.0.0.2') == 200


def test_only_the_x_forwarded_for_entry_the_trusted_proxy_appended_names_the_client(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1')
    with one_upload_held(web, '203.0.113.9, 198.51.100.1'):
        assert request_as(web, '10.9.9.9, 198.51.100.1') == 503      # what a client writes left of it is not it
        assert request_as(web, '198.51.100.1, 198.51.100.2') == 200
        assert wait_for(lambda: '198.51.100.2 GET /health 200' in web.output(), 10)


def test_a_header_naming_this_host_itself_counts_the_request_under_its_peer(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1')
    stop, held = hold_requests(web, 1, forwarded_for='127.0.0.1', source='127.0.0.5')
    try:
        assert wait_for(lambda: len(staged(web)) == 1, 10)
        assert request_as(web, source='127.0.0.1') == 200            # the host's own health check keeps its share
        assert request_as(web, source='127.0.0.5') == 503
    finally:
        release(stop, held)


def test_connections_through_a_trusted_proxy_count_against_the_client_they_carry(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='2', MAX_REQUESTS_PER_CLIENT='50')
    carrying = [connect(web) for _ in range(2)]
    with held_open(carrying):
        for connection in carrying:        # kept alive after an answer for 198.51.100.1
            connection.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n')
            answer = http.client.HTTPResponse(connection)
            answer.begin()
            assert (answer.status, answer.read()) == (200, b'{"storage": "ok", "thumbnails": "ok"}')
        with connect(web) as third:
            third.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n')
            status, headers, _ = answer_of(third)
        assert (status, headers['Retry-After']) == (503, '5')
        assert request_as(web, '198.51.100.2') == 200


def test_a_trusted_peers_idle_connections_beyond_the_cap_are_closed_within_seconds(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='2', REQUEST_HEAD_TIMEOUT='30')
    with held_open([connect(web) for _ in range(6)]) as idle:
        time.sleep(front.PROXY_HEAD_SECONDS + 1)
        closed = [closed_by_server(connection) for connection in idle]
    assert closed == [False, False, True, True, True, True]


def closed_by_server(connection):
    """Whether the server has closed this connection (its end read), without waiting."""
    connection.settimeout(0.2)
    try:
        return connection.recv(1) == b''
    except TimeoutError:
        return False
    except OSError:
        return True


# --- The waiting room: thumbnails beyond the threads they may hold wait their turn ---------------------------

def thumbnail_request(name, scale=123):
    return f'/fileget?coll=Fish&type=T&filename={quote(name)}&scale={scale}'


def test_thumbnail_requests_beyond_the_threads_they_may_hold_wait_and_are_answered(start, photo_2mp):
    web = start(THREADS='6', THUMBNAIL_WORKERS='1', THUMBNAIL_QUEUE='0')    # one thread for conversions
    names = [f'wait{i}.jpg' for i in range(8)]
    for name in names:
        (web.base_dir / 'originals').mkdir(parents=True, exist_ok=True)
        (web.base_dir / 'originals' / name).write_bytes(photo_2mp)
    statuses = collections.Counter()
    askers = [in_background(lambda name=name, index=index: statuses.update(
        [request_as(web, path=thumbnail_request(name), source=f'127.0.0.{10 + index}')]))
        for index, name in enumerate(names)]
    for asker in askers:
        asker.join(120)
    assert statuses == {200: 8}


def test_while_thumbnails_wait_their_turn_other_requests_are_answered_at_once(start, photo_2mp):
    web = start(THREADS='6', THUMBNAIL_WORKERS='1', THUMBNAIL_QUEUE='0', THUMBNAIL_QUEUE_WAIT='60')
    (web.base_dir / 'originals').mkdir(parents=True, exist_ok=True)
    for index in range(12):
        (web.base_dir / 'originals' / f'busy{index}.jpg').write_bytes(photo_2mp)
    askers = [in_background(request_as, web, None, 'X-Forwarded-For', thumbnail_request(f'busy{index}.jpg', 1500),
                            f'127.0.0.{10 + index}') for index in range(12)]
    time.sleep(1)
    started = time.monotonic()
    assert request_as(web, source='127.0.0.99') == 200
    assert time.monotonic() - started < BYSTANDER_SECONDS
    for asker in askers:
        asker.join(120)


def test_a_thumbnail_request_that_waits_longer_than_the_queue_wait_is_answered_503_with_retry_after(start):
    web = start(THREADS='6', THUMBNAIL_WORKERS='1', THUMBNAIL_QUEUE='0', THUMBNAIL_QUEUE_WAIT='1',
                THUMBNAIL_TIMEOUT='4')
    (web.base_dir / 'originals').mkdir(parents=True, exist_ok=True)
    (web.base_dir / 'originals' / 'slow.pdf').write_bytes(nested_forms_pdf())     # takes its whole timeout
    (web.base_dir / 'originals' / 'next.jpg').write_bytes(b'\xff\xd8\xff' + bytes(100))
    slow = in_background(request_as, web, None, 'X-Forwarded-For', thumbnail_request('slow.pdf'), '127.0.0.10')
    time.sleep(0.5)
    started = time.monotonic()
    with connect(web, '127.0.0.11') as waiting:
        waiting.sendall(f'GET {thumbnail_request("next.jpg")} HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
        status, headers, _ = answer_of(waiting)
    assert (status, headers['Retry-After']) == (503, '5')
    assert 1 <= time.monotonic() - started < 3.5           # while the other still converts
    slow.join(60)


def test_the_waiting_room_lets_clients_in_one_at_a_time_in_turn():
    room = WaitingRoom(lambda head: True, budget=1, wait=60)
    arriving = [types.SimpleNamespace(client=client, name=name) for client, name in
                [('a', 'a1'), ('a', 'a2'), ('a', 'a3'), ('a', 'a4'), ('b', 'b1'), ('c', 'c1'), ('b', 'b2')]]
    admitted_at_once = [room.enter(connection) for connection in arriving]
    order, done = [], arriving[0]
    while let_in := room.leave(done.client):
        done, = let_in
        order.append(done.name)
    assert admitted_at_once == [True] + [False] * 6
    assert order == ['a2', 'b1', 'c1', 'a3', 'b2', 'a4']


def test_no_client_holds_more_than_half_the_waiting_rooms_threads_so_another_is_let_in_at_once():
    room = WaitingRoom(lambda head: True, budget=3, wait=60)
    flood = [types.SimpleNamespace(client='flood') for _ in range(5)]
    assert [room.enter(connection) for connection in flood] == [True, True, False, False, False]
    assert room.enter(types.SimpleNamespace(client='bystander')) is True


def test_the_waiting_room_lets_in_a_client_under_its_fair_share_before_one_at_it():
    room = WaitingRoom(lambda head: True, budget=6, wait=60)       # three clients present: a share is 2
    arriving = [types.SimpleNamespace(client=client, name=name) for client, name in
                [('f', 'f0'), ('f', 'f1'), ('c', 'c0'), ('c', 'c1'), ('c', 'c2'), ('a', 'a0'), ('f', 'f2'), ('a', 'a1')]]
    assert [room.enter(connection) for connection in arriving] == [True] * 6 + [False, False]
    assert [connection.name for connection in room.leave('c')] == ['a1']   # f has its share of 2 running, a 1


def test_the_waiting_room_gives_up_requests_that_waited_their_time():
    now = [0.0]
    room = WaitingRoom(lambda head: True, budget=1, wait=20, clock=lambda: now[0])
    first, late, later = (types.SimpleNamespace(client=client) for client in 'abc')
    room.enter(first)
    room.enter(late)
    now[0] = 10
    room.enter(later)
    now[0] = 20
    assert (room.expired(now[0]), room.next_deadline()) == ([late], 30)


@pytest.mark.parametrize('head, waits', [
    (b'GET /fileget?coll=Fish&type=T&filename=a.jpg&scale=123 HTTP/1.1', True),
    (b'GET /fileget?filename=a.jpg&type=T HTTP/1.1', True),
    (b'GET /getfileref?type=T&filename=a.jpg HTTP/1.1', True),
    (b'GET /iiif/3/a.jpg/info.json HTTP/1.1', True),
    (b'GET /fileget?filename=a.jpg&type=%54 HTTP/1.1', True),
    (b'GET /%66ileget?type=T&filename=a.jpg HTTP/1.1', True),
    (b'GET /./fileget?type=T&filename=a.jpg HTTP/1.1', True),
    (b'GET /static/../iiif/3/a.jpg/info.json HTTP/1.1', True),
    (b'GET http://assets.example.org/fileget?type=T&filename=a.jpg HTTP/1.1', True),
    (b'GET /fileget?coll=Fish&type=O&filename=a.jpg HTTP/1.1', False),
    (b'GET /fileget?filename=type=T.jpg HTTP/1.1', False),
    (b'POST /fileupload HTTP/1.1', False),
    (b'GET /health HTTP/1.1', False)])
def test_only_requests_for_thumbnails_and_iiif_go_through_the_waiting_room(head, waits):
    assert server.waits_for_conversions(head) is waits


# --- Lingering close -------------------------------------------------------------------------

@pytest.mark.parametrize('megabytes', [3, 8, 30])
def test_an_upload_over_max_upload_size_is_answered_413_that_the_client_reads(start, megabytes):
    web = start(MAX_UPLOAD_SIZE=str(2 * 1024 ** 2))
    head, body = upload_request('large.jpg', b'\xff\xd8' + bytes(megabytes * 1024 ** 2))
    client = http.client.HTTPConnection('127.0.0.1', web.port, timeout=30)      # sends it all, then reads
    for _ in range(3):
        client.request('POST', '/fileupload', body, dict(line.split(': ', 1) for line in
                                                         head.decode().split('\r\n')[1:] if line))
        answer = client.getresponse()
        assert (answer.status, answer.read()) == (413, f'The upload is larger than this server accepts '
                                                       f'({2 * 1024 ** 2} bytes).'.encode())
        client.close()


def test_a_client_that_stops_sending_after_an_early_answer_is_closed_within_the_quiet_time(start):
    web = start(MAX_UPLOAD_SIZE='1000')
    head, body = upload_request('large.jpg', b'\xff\xd8' + bytes(100_000))
    with connect(web) as connection:
        connection.sendall(head + body[:5000])
        status = int(connection.recv(100).split()[1])
        started = time.monotonic()
        while connection.recv(65536):
            pass
    assert status == 413
    assert time.monotonic() - started < front.LINGER_QUIET_SECONDS + 3


# === The front probed as an attacker would: accounting after resets, framing, Expect, slow readers ==============

def reset(connection):
    """Close with SO_LINGER 0: the kernel sends a TCP reset, not a FIN."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    connection.close()


def read_all(connection):
    received = b''
    while chunk := connection.recv(65536):
        received += chunk
    return received


def statuses(received):
    return [int(code) for code in re.findall(rb'HTTP/1\.1 (\d{3}) ', received)]


def health(connection):
    """One GET /health on a kept-alive connection: its status, or None when refused or closed."""
    connection.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
    answer = http.client.HTTPResponse(connection)
    try:
        answer.begin()
        answer.read()
    except (OSError, http.client.HTTPException):
        return None
    return answer.status


def serves_a_full_cap(web, cap, source='127.0.0.1'):
    """True when `cap` connections at once from one address are each answered 200."""
    held = []
    try:
        held = [connect(web, source) for _ in range(cap)]
        return all(health(connection) == 200 for connection in held)
    finally:
        for connection in held:
            connection.close()




# --- Accounting ----------------------------------------------------------------------------------

def test_connections_reset_at_once_by_a_client_at_its_cap_leave_it_its_full_cap_afterwards(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='3')
    for _ in range(300):
        held = [connect(web) for _ in range(3)]
        for connection in held:
            reset(connection)
    assert wait_for(lambda: serves_a_full_cap(web, 3), 10)


def test_connections_reset_at_once_by_a_client_at_its_cap_do_not_lift_max_connections(start):
    web = start(MAX_CONNECTIONS='4', MAX_CONNECTIONS_PER_CLIENT='2')
    held = []

    def full_cap_held():
        """Two connections answered 200 (the start-up check's connection counts until its thread is done)."""
        for connection in held:
            connection.close()
        held[:] = [connect(web) for _ in range(2)]
        return all(health(connection) == 200 for connection in held)
    assert wait_for(full_cap_held, 10)
    for _ in range(front.REFUSALS_LINGERING - 10):       # fewer than are answered 503 at once
        reset(connect(web))

    def served_and_held(source):
        connection = connect(web, source)
        if health(connection) == 200:
            held.append(connection)
            return True
        connection.close()
        return False
    try:
        assert wait_for(lambda: served_and_held('127.0.0.2'), 10) and wait_for(lambda: served_and_held('127.0.0.3'), 10)
        with connect(web, '127.0.0.4') as fifth:
            assert health(fifth) == 503
    finally:
        for connection in held:
            connection.close()


# --- Slow readers ----------------------------------------------------------------------------------

def holds_connection(web, connection):
    """True while the server process still has a descriptor for its end of `connection` (Linux)."""
    port = connection.getsockname()[1]
    with open('/proc/net/tcp') as rows:
        inodes = {f'socket:[{fields[9]}]' for fields in map(str.split, rows)
                  if fields[1].endswith(f':{web.port:04X}') and fields[2].endswith(f':{port:04X}')}
    try:
        return any(os.readlink(f'/proc/{web.process.pid}/fd/{fd}') in inodes
                   for fd in os.listdir(f'/proc/{web.process.pid}/fd'))
    except FileNotFoundError:       # a descriptor closed while we looked
        return holds_connection(web, connection)


def unread_by_server(web, connection):
    """Bytes the client sent on `connection` that the server has not read yet (its receive queue), or None."""
    port = connection.getsockname()[1]
    with open('/proc/net/tcp') as rows:
        for fields in map(str.split, rows):
            if fields[1].endswith(f':{web.port:04X}') and fields[2].endswith(f':{port:04X}'):
                return int(fields[4].split(':')[1], 16)
    return None


def test_a_client_that_stops_reading_a_download_is_dropped_after_socket_timeout(start, jpeg):
    web = start(SOCKET_TIMEOUT='2')
    data = jpeg + bytes(30 * 1024 ** 2)
    head, body = upload_request('large.jpg', data, extra='Connection: close\r\n')
    with connect(web) as uploading:
        uploading.sendall(head + body)
        assert statuses(read_all(uploading)) == [200]
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.settimeout(30)
    reader.connect(('127.0.0.1', web.port))
    with reader:
        reader.sendall(b'GET /fileget?coll=Fish&type=O&filename=large.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        assert reader.recv(12) == b'HTTP/1.1 200'                       # then it reads no more
        started = time.monotonic()
        assert wait_for(lambda: not holds_connection(web, reader), 2 + 10)
        assert time.monotonic() - started >= 1
        assert len(read_all(reader)) < len(data)


def test_a_connection_closed_twice_is_counted_out_once(tmp_path):
    """close_those_closed_by may close a connection whose end the same select() reported: MAX_CONNECTIONS held
    open by four clients let a fifth in after a storm of resets."""
    front_ = front.Front(load_config({'BASE_DIR': str(tmp_path), 'KEY': KEY}, environ={}), lambda _: None)
    with socket.create_server(('127.0.0.1', 0)) as listener, front_.wake_in, front_.wake_out, \
            socket.create_connection(listener.getsockname()):
        accepted, peer = listener.accept()
        front_.admit(accepted, peer)
        assert wait_for(lambda: [key.data for key in front_.selector.get_map().values() if key.data], 5)
        connection, = [key.data for key in front_.selector.get_map().values() if key.data]
        front_.close(connection)
        front_.readable(connection)                  # its end, reported by the same select()
        front_.close(connection)
        assert (front_.total, dict(front_.open)) == (0, {})


def test_a_connection_the_front_admits_sends_its_segments_without_waiting_for_acks(tmp_path):
    front_ = front.Front(load_config({'BASE_DIR': str(tmp_path), 'KEY': KEY}, environ={}), lambda _: None)
    with socket.create_server(('127.0.0.1', 0)) as listener, front_.wake_in, front_.wake_out, \
            socket.create_connection(listener.getsockname()):
        accepted, peer = listener.accept()
        with accepted:
            front_.admit(accepted, peer)        # a GET's answer: its head, then a body shorter than a segment
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def slow_reader(web, path, source='127.0.0.1'):
    """A connection from `source` with a small receive buffer that asks for `path`, reads the status line and
    then, unless the test reads on, nothing more."""
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.settimeout(30)
    reader.bind((source, 0))
    reader.connect(('127.0.0.1', web.port))
    reader.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
    assert reader.recv(12) == b'HTTP/1.1 200'
    return reader


def read_paced(connection, rate, stop=None):
    """Everything the server sends on `connection`, read at about `rate` bytes a second until it closes."""
    received, started = bytearray(), time.monotonic()
    with contextlib.suppress(OSError):
        while not (stop and stop.is_set()) and (chunk := connection.recv(4096)):
            received += chunk
            ahead = started + len(received) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return bytes(received)


def stored_large(web, jpeg, megabytes, name='large.jpg'):
    """Upload a JPEG padded with noise to `megabytes` MiB: its bytes, and the path that downloads it."""
    data = jpeg + os.urandom(megabytes * MiB)
    head, body = upload_request(name, data, extra='Connection: close\r\n')
    with connect(web) as uploading:
        uploading.sendall(head + body)
        assert statuses(read_all(uploading)) == [200]
    return data, f'/fileget?coll=Fish&type=O&filename={name}'


def test_twenty_readers_that_stop_reading_hold_no_thread_so_health_is_answered_at_once(start, jpeg):
    web = start()                                    # THREADS 20, MAX_REQUESTS_PER_CLIENT 10
    _data, path = stored_large(web, jpeg, 4)
    readers = [slow_reader(web, path, source) for source in ('127.0.0.1', '127.0.0.2') for _ in range(10)]
    try:
        for _ in range(3):
            health = ask(web, 'GET', '/health', source='127.0.0.3', timeout=8)
            assert (health.status, health.seconds < BYSTANDER_SECONDS) == (200, True), health
    finally:
        for reader in readers:
            reader.close()


def test_a_reader_slower_than_answer_min_rate_after_the_grace_is_dropped(start, jpeg):
    web = start(ANSWER_GRACE='1', ANSWER_MIN_RATE=str(MiB))     # the kernel's buffers may take 4 MiB at once
    data, path = stored_large(web, jpeg, 12)
    stop = threading.Event()
    with slow_reader(web, path) as reader:
        started, reading = time.monotonic(), Background(lambda: read_paced(reader, 8192, stop))
        try:
            assert wait_for(lambda: not holds_connection(web, reader), 15)
            assert time.monotonic() - started >= 1
        finally:
            stop.set()
        assert len(reading.joined()) < len(data)


def test_a_reader_above_answer_min_rate_completes_a_download_larger_than_the_kernels_buffers(start, jpeg):
    web = start(ANSWER_GRACE='1', ANSWER_MIN_RATE=str(512 * 1024))     # read at twice the minimum
    data, path = stored_large(web, jpeg, 8)
    with slow_reader(web, path) as reader:
        started = time.monotonic()
        received = b'HTTP/1.1 200' + read_paced(reader, MiB)
        seconds = time.monotonic() - started
    assert received.partition(b'\r\n\r\n')[2] == data and seconds > 4     # paced by the reader, and whole


def test_the_answer_rate_counts_what_the_worker_thread_handed_the_kernel_too():
    """A 4 MiB download read at 1 Mbit/s was cut after 24 s: the kernel took 3 MB from the worker thread at once,
    and the sender, which sent little while the client drained them, counted only its own bytes."""
    writer = types.SimpleNamespace(unsent=bytearray(b'rest'), sent=3 * MiB, started=100.0)
    answer = front.Answer(None, writer, chunks=None, result=None, keep_alive=True, read_whole=True)
    answer.progressed = 10_000.0                           # not stalled
    config = types.SimpleNamespace(SOCKET_TIMEOUT=60, ANSWER_GRACE=1, ANSWER_MIN_RATE=4096)
    assert front.Sender.deadline(types.SimpleNamespace(config=config), answer) == 100 + 1 + 3 * MiB / 4096


def incompressible_png(width, height):
    """An RGB PNG of random pixels, which no encoder makes much smaller than width x height x 3 bytes."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    rows = b''.join(b'\0' + os.urandom(3 * width) for _ in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows, 0)) + chunk(b'IEND', b''))


def test_slow_readers_of_iiif_answers_cut_anew_hold_a_piece_of_each_not_the_whole(launch):
    target = launch()
    name = unique('noise.png')
    target.stored(name, incompressible_png(2048, 2048))
    path = f'/iiif/3/{quote(name, safe="")}/full/max/0/default.png'      # PNG: cut anew for every request
    whole = ask(target.web, 'GET', path)
    assert whole.status == 200 and len(whole.body) > 10 * MiB
    before = rss(target.pid)
    readers = [slow_reader(target.web, path) for _ in range(8)]
    try:
        time.sleep(1)
        held = rss(target.pid) - before
        target.assert_bystander_served()
    finally:
        for reader in readers:
            reader.close()
    assert held < 8 * len(whole.body) / 4, f'{held / MiB:.0f} MiB held by 8 readers of {len(whole.body) / MiB:.0f} MiB'


# --- Request framing ------------------------------------------------------------------------------

SMUGGLED = b'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n'


@pytest.mark.parametrize('lengths', [[b'0', b'%d' % len(SMUGGLED)], [b'0, %d' % len(SMUGGLED)], ['\xb2'.encode('latin-1')]],
                         ids=['two headers', 'a list', 'a latin-1 digit'])
def test_a_content_length_that_is_not_one_number_is_answered_400_and_its_body_never_taken_for_a_request(start, lengths):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'POST /filedelete HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n'
                           + b''.join(b'Content-Length: %s\r\n' % length for length in lengths) + b'\r\n' + SMUGGLED)
        connection.shutdown(socket.SHUT_WR)
        received = read_all(connection)
    assert statuses(received) == [400] and received.endswith(b'Bad Request.')
    assert '/smuggled' not in web.output()


def test_a_chunked_request_body_is_answered_411_length_required_and_never_taken_for_a_request(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'POST /filedelete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                           + b'%x\r\n%s\r\n0\r\n\r\n' % (len(SMUGGLED), SMUGGLED) + SMUGGLED)
        connection.shutdown(socket.SHUT_WR)
        received = read_all(connection)
    assert statuses(received) == [411] and received.endswith(b'Length Required.')
    assert '/smuggled' not in web.output()



# --- Expect: 100-continue ----------------------------------------------------------------------------

def curl_upload(web, path, name):
    """Real curl uploading `path` as Specify does (it sends Expect: 100-continue for more than 1 MB): its
    verbose trace and the figures it reports."""
    done = subprocess.run(['curl', '-sS', '-v', '-w', r'\n%{http_code} %{size_upload}', '-F', f'file=@{path}',
                           '-F', f'store={name}', '-F', 'type=O', '-F', 'coll=Fish', '-F',
                           f'token={make_token(KEY, name)}', f'http://127.0.0.1:{web.port}/fileupload'],
                          capture_output=True, text=True, timeout=60)
    status, uploaded = done.stdout.rsplit('\n', 1)[1].split()
    return done.stderr, int(status), int(uploaded)


def test_curl_uploading_3_mb_is_sent_100_continue_once_and_stored(start, jpeg, tmp_path):
    web = start()
    data = jpeg + bytes(3 * 1024 ** 2)
    (tmp_path / 'three.jpg').write_bytes(data)
    trace, status, uploaded = curl_upload(web, tmp_path / 'three.jpg', 'three.jpg')
    assert '> Expect: 100-continue' in trace and trace.count('< HTTP/1.1 100 Continue') == 1
    assert status == 200 and uploaded > len(data)
    assert web.request('GET', '/fileget?coll=Fish&type=O&filename=three.jpg')[2] == data


def test_curl_uploading_over_max_upload_size_is_answered_413_before_it_sends_the_body(start, jpeg, tmp_path):
    web = start(MAX_UPLOAD_SIZE=str(2 * 1024 ** 2))
    (tmp_path / 'large.jpg').write_bytes(jpeg + bytes(8 * 1024 ** 2))
    trace, status, uploaded = curl_upload(web, tmp_path / 'large.jpg', 'large.jpg')
    assert '> Expect: 100-continue' in trace and '100 Continue' not in trace.replace('> Expect: 100-continue', '')
    assert (status, uploaded) == (413, 0)


def test_an_answer_given_before_the_body_was_read_says_the_connection_closes(start):
    web = start(MAX_UPLOAD_SIZE='1000')
    head, _ = upload_request('large.jpg', bytes(100_000), extra='Expect: 100-continue\r\n')
    with connect(web) as connection:
        connection.sendall(head)
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        assert (answer.status, answer.getheader('Connection')) == (413, 'close')


def test_after_a_storm_of_resets_at_every_stage_a_client_is_again_served_a_full_cap(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='4', MAX_UPLOAD_SIZE='1000', THREADS='5')
    head, body = upload_request('a.jpg', b'\xff\xd8' + bytes(50_000))
    stages = [b'GET /health HTTP/1.1\r\nHost: x\r\n',                                  # mid-head
              head + body[:20_000],                                                    # mid-body (413, lingering)
              b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n' * 3,                           # pipelined, kept alive
              b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',            # answered and closed
              b'POST /filedelete HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n' + bytes(30_000)]

    def storm(stage):
        for _ in range(40):
            try:
                connection = connect(web)
                connection.sendall(stage)
                if stage.endswith(b'\r\n\r\n'):
                    connection.recv(100)
                reset(connection)
            except OSError:
                pass
    threads = [threading.Thread(target=storm, args=(stage,)) for stage in stages * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert wait_for(lambda: serves_a_full_cap(web, 4), 15)


# --- Request heads parsed as strictly as RFC 9112 asks ---------------------------------------------------

SMUGGLED = b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n'
LENIENT_HEADS = {     # each hides a Content-Length from a parser that ends the header block early, or shows one
    'a bare CR': b'X-A: 1\rContent-Length: 38\r\n',
    'whitespace before the colon': b'Content-Length : 38\r\n',
    'a line without a colon': b'X-A 1\r\nContent-Length: 38\r\n',
    'an obs-fold line': b'X-A: 1\r\n Content-Length: 38\r\n',
}


@pytest.mark.parametrize('fault', LENIENT_HEADS)
def test_a_head_framed_leniently_is_answered_400_before_dispatch_and_its_body_never_runs(start, fault):
    web = start()
    request = b'POST /testkey HTTP/1.1\r\nHost: x\r\n' + LENIENT_HEADS[fault] + b'\r\n' + SMUGGLED
    with connect(web) as connection:
        connection.sendall(request)
        status, headers, body = answer_of(connection)
    assert (status, headers['Connection'], body) == (400, 'close', b'Bad Request.')
    assert 'GET /health' not in web.output() and 'POST /testkey' not in web.output()


def test_a_head_with_every_line_well_framed_is_served(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Tab:\tcaf\xe9\r\n'
                           b'Connection: close\r\n\r\n')
        assert answer_of(connection)[0] == 200


# --- Request heads as they arrive ----------------------------------------------------------------------

@pytest.mark.parametrize('split', [b'\r', b'\r\n', b'\r\n\r'], ids=['before LF', 'between the lines', 'before the last LF'])
def test_a_head_whose_end_arrives_split_across_reads_is_answered(start, split):
    web = start()
    head = b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    first = head[:head.rindex(b'\r\n\r\n') + len(split)]
    with connect(web) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.sendall(first)
        assert wait_for(lambda: unread_by_server(web, connection) == 0, 10)     # read apart from the rest
        connection.sendall(head[len(first):])
        assert statuses(read_all(connection)) == [200]


def test_a_head_with_bare_lf_line_ends_is_answered(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'GET /health HTTP/1.1\nHost: x\nConnection: close\n\n')
        assert statuses(read_all(connection)) == [200]


def test_a_head_request_leaves_a_kept_alive_connection_in_step_for_the_next_request(start):
    web = start()
    with connect(web) as connection:
        connection.sendall(b'HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n'
                           b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        received = read_all(connection)
    assert statuses(received) == [200, 200] and received.endswith(b'"thumbnails": "ok"}')
    assert received.count(b'"storage"') == 1
