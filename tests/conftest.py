"""Shared helpers: an app per test on a fresh attachments folder, Specify-style requests, images."""

import contextlib
import json
import os
import http.client
import random
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import time
import zlib

import pytest
import webtest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import front  # noqa: E402
import iiif  # noqa: E402
import server  # noqa: E402

KEY = 'test-attachment-key'
IMAGEMAGICK = server.find_imagemagick(None)


class Client:
    """A WebTest client that speaks the protocol as Specify does."""

    def __init__(self, config):
        self.config = config
        self.app = server.create_app(config)
        self.web = webtest.TestApp(self.app)
        self.unlinted = webtest.TestApp(self.app, lint=False)    # for requests no valid WSGI server would pass on
        self.base = config.BASE_DIR

    def token(self, name, timestamp=None):
        return server.make_token(KEY, name, timestamp)

    def upload(self, store, data, coll='Fish', style=7, token=None, kind='O', status=None, **extra):
        """POST /fileupload like Specify 7 (file part first, named `file`) or 6 (fields first)."""
        token = self.token(store) if token is None else token
        fields = [('store', store), ('type', kind), ('coll', coll), ('token', token)]
        if style == 7:
            parts = [('file', 'blob', data)] + fields
        else:
            fields += [('disp', 'Fishes'), ('div', 'Zoology'), ('inst', 'Museum')]
            parts = fields + [('photo.jpg', 'photo.jpg', data)]
        content_type, body = multipart_body(parts)
        return self.post_raw('/fileupload', content_type, body, status=status, **extra)

    def post_raw(self, path, content_type, body=b'', status=None, **extra):
        """POST exactly these bytes (WebTest would otherwise re-encode a multipart body)."""
        if 'extra_environ' in extra:          # the test supplies its own wsgi.input
            extra['environ'] = extra.pop('extra_environ')
        else:
            extra['body'] = body
        return expect(status, self.web.request(path, method='POST', content_type=content_type,
                                               expect_errors=status is not None, **extra))

    def get(self, path, params, status=None, headers=None):
        return expect(status, self.web.get(path, params, expect_errors=status is not None, headers=headers or {}))

    def fileget(self, filename, kind='O', status=None, headers=None, **params):
        params = {'filename': filename, 'type': kind, 'coll': 'Fish', **params}
        return self.get('/fileget', params, status, headers)

    def delete(self, filename, coll='Fish', token=None, status=None):
        token = self.token(filename) if token is None else token
        return expect(status, self.web.post('/filedelete', {'filename': filename, 'coll': coll, 'token': token,
                                                            'disp': 'Fishes', 'div': 'Zoology', 'inst': 'Museum'},
                                            expect_errors=status is not None))

    def path(self, *parts):
        return os.path.join(self.base, *parts)

    def all_files(self):
        """Every stored file (and any left in BASE_DIR), relative to the storage's root; not the key file."""
        found = set()
        for folder, _dirs, files in os.walk(self.base):
            for name in files:
                found.add(os.path.relpath(os.path.join(folder, name), self.base))
        found.discard('.web-asset-server.key')
        if self.config.STORAGE == 's3':
            storage = self.app.storage
            listing = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix + '/')
            found.update(item['Key'][len(storage.prefix) + 1:] for item in listing.get('Contents', []))
        return found

    def stored(self, relative):
        """The bytes stored at a path relative to the storage's root."""
        if self.config.STORAGE == 's3':
            storage = self.app.storage
            return storage.client.get_object(Bucket=storage.bucket, Key=f'{storage.prefix}/{relative}')['Body'].read()
        with open(self.path(relative), 'rb') as f:
            return f.read()

    def leftovers(self):
        """Temporary files or folders of the server's left under BASE_DIR."""
        return [os.path.join(folder, name) for folder, dirs, files in os.walk(self.base)
                for name in dirs + files if name.startswith(server.TEMP_PREFIX)]


def expect(status, answer):
    """The answer, once its status is the one expected ('*': any); WebTest checks none when errors are expected."""
    if status not in (None, '*'):
        assert answer.status_int == status, f'answered {answer.status}, not {status}: {answer.text[:300]}'
    return answer


def multipart_body(parts, boundary=None):
    """multipart/form-data in the given order: (name, value) fields, (name, filename, bytes) files."""
    boundary = boundary or 'specify' + secrets.token_hex(8)
    chunks = []
    for part in parts:
        if len(part) == 2:
            head = f'Content-Disposition: form-data; name="{part[0]}"'
            data = part[1].encode('utf-8')
        else:
            head = (f'Content-Disposition: form-data; name="{part[0]}"; filename="{part[1]}"\r\n'
                    'Content-Type: application/octet-stream')
            data = part[2]
        chunks.append(f'--{boundary}\r\n{head}\r\n\r\n'.encode('utf-8') + data + b'\r\n')
    chunks.append(f'--{boundary}--\r\n'.encode())
    return f'multipart/form-data; boundary={boundary}', b''.join(chunks)


def magick(*args, output=None):
    """Run the real ImageMagick; with `output`, return the bytes it wrote there."""
    subprocess.run([IMAGEMAGICK, *args], check=True, capture_output=True, timeout=120)
    if output:
        with open(output, 'rb') as f:
            return f.read()


def image_info(data, tmp_path):
    """(format, width, height) of image bytes, decoded by ImageMagick."""
    path = tmp_path / f'probe-{secrets.token_hex(4)}'
    path.write_bytes(data)
    identify = subprocess.run([IMAGEMAGICK, str(path) + '[0]', '-format', '%m %w %h', 'info:'],
                              check=True, capture_output=True, text=True, timeout=60)
    kind, width, height = identify.stdout.split()
    return kind, int(width), int(height)


def make_image(tmp_path, spec, size, fmt, *extra):
    """Image bytes made by ImageMagick: e.g. make_image(tmp, 'plasma:', '300x200', 'jpg')."""
    out = tmp_path / f'made-{secrets.token_hex(4)}.{fmt}'
    return magick('-size', size, spec, *extra, f'{fmt}:{out}', output=out)


@pytest.fixture(autouse=True)
def nothing_remembered_from_another_test():
    """Every test computes what it checks: the memo caches (IIIF plans and tile grids, trusted addresses) start
    empty, so no answer is one remembered from another test run in the same process (as mutation testing runs
    each mutant's tests in a process forked from one that ran them all unmutated)."""
    iiif.remembered_plan.cache_clear()
    iiif.tile_grid.cache_clear()
    front.is_trusted.cache_clear()


def pytest_collection_modifyitems(items):
    """Under mutation testing (mutmut names the mutant in MUTANT_UNDER_TEST), the quickest tests first, by the
    durations mutmut recorded: a mutant is known killed at its first failing test (it runs them with -x), and
    mutmut hands them over in no particular order."""
    if os.environ.get('MUTANT_UNDER_TEST', 'stats') in ('', 'stats', 'fail', 'mutant_generation') \
            or not os.path.exists('mutmut-stats.json'):
        return
    with open('mutmut-stats.json', encoding='utf-8') as stats:
        durations = json.load(stats)['duration_by_test']
    items.sort(key=lambda item: durations.get(item.nodeid, 0))


def pytest_generate_tests(metafunc):
    """Run every test that uses a client on both storages, unless it is marked disk_only or s3_only."""
    if 'storage' in metafunc.fixturenames:
        marked = {name for name in ('disk', 's3') if metafunc.definition.get_closest_marker(f'{name}_only')}
        metafunc.parametrize('storage', sorted(marked) or ['disk', 's3'], indirect=True)


@pytest.fixture(scope='session')
def seaweed(tmp_path_factory):
    """One SeaweedFS S3 server for the session; each test gets its own key prefix."""
    store = SeaweedFS(tmp_path_factory.mktemp('seaweed'))
    yield store
    store.stop()


@pytest.fixture
def storage(request):
    """Settings for the storage under test: disk, or S3 on SeaweedFS with a fresh prefix."""
    if request.param == 'disk':
        return {'STORAGE': 'disk'}
    return request.getfixturevalue('seaweed').settings(prefix='test-' + secrets.token_hex(6))


@pytest.fixture
def make_client(tmp_path, storage):
    """Build a client for settings overriding the defaults; the attachments live in tmp_path."""
    def build(**overrides):
        settings = {'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY, 'ACCESS_LOG': False,
                    'PREGENERATE_SCALE': None, 'SERVER_NAME': 'assets.example.org', 'SERVER_PORT': 8080,
                    **storage}
        settings.update(overrides)
        return Client(server.load_config(settings, environ={}))
    return build


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope='session')
def jpeg(tmp_path_factory):
    """A 300x200 JPEG photo."""
    return make_image(tmp_path_factory.mktemp('img'), 'plasma:', '300x200', 'jpg')


@pytest.fixture(scope='session')
def png(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp('img'), 'gradient:red-blue', '80x60', 'png')


def png_bytes(width, height):
    """A grey PNG made without ImageMagick (for tests that need many images quickly)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    rows = b''.join(b'\0' + bytes([128]) * width for _ in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def wait_for(predicate, seconds=10):
    """True as soon as predicate() is; False if it still is not after `seconds` (a deadline, never a guess)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _ifd(entries, start):
    """One little-endian TIFF directory placed at `start`: (tag, type, value) with ASCII, SHORT, LONG."""
    data_at = start + 2 + 12 * len(entries) + 4
    head, data = struct.pack('<H', len(entries)), b''
    for tag, kind, value in sorted(entries):
        raw = value.encode() + b'\0' if kind == 2 else struct.pack('<H' if kind == 3 else '<I', value)
        field = raw.ljust(4, b'\0') if len(raw) <= 4 else struct.pack('<I', data_at + len(data))
        if len(raw) > 4:
            data += raw
        head += struct.pack('<HHI', tag, kind, len(raw) if kind == 2 else 1) + field
    return head + struct.pack('<I', 0) + data


def with_exif(jpeg_bytes, date=None, orientation=None, make='Canon', latitude_ref='N'):
    """The JPEG with an Exif APP1 segment: Make and Orientation (Image), DateTimeOriginal, GPS."""
    image = [(0x010F, 2, make)] + ([(0x0112, 3, orientation)] if orientation else [])
    exif = [(0x9003, 2, date)] if date else [(0x9000, 2, '0230')]
    gps = [(0x0001, 2, latitude_ref)]
    ifd0_size = len(_ifd(image + [(0x8769, 4, 0), (0x8825, 4, 0)], 8))
    exif_at = 8 + ifd0_size
    gps_at = exif_at + len(_ifd(exif, exif_at))
    tiff = (b'II*\0' + struct.pack('<I', 8) + _ifd(image + [(0x8769, 4, exif_at), (0x8825, 4, gps_at)], 8)
            + _ifd(exif, exif_at) + _ifd(gps, gps_at))
    payload = b'Exif\0\0' + tiff
    segment = b'\xff\xe1' + struct.pack('>H', len(payload) + 2) + payload
    app0_end = 4 + struct.unpack('>H', jpeg_bytes[4:6])[0] if jpeg_bytes[2:4] == b'\xff\xe0' else 2
    return jpeg_bytes[:app0_end] + segment + jpeg_bytes[app0_end:]


def free_port():
    """A loopback port free now: another process may take it before ours binds, so callers retry (see `started`)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def holds_listener(pid, port):
    """True when process `pid` itself holds a socket listening on `port`, so what answers there is ours (Linux)."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as rows:
            inodes.update(f'socket:[{fields[9]}]' for fields in map(str.split, rows)
                          if fields[1].endswith(f':{port:04X}') and fields[3] == '0A')
    try:
        return any(os.readlink(f'/proc/{pid}/fd/{fd}') in inodes for fd in os.listdir(f'/proc/{pid}/fd'))
    except OSError:          # the process ended, or closed a descriptor while we looked
        return False


PORT_TAKEN = 'address already in use'


def started(launch, ready, seconds, attempts=5):
    """launch() a process on fresh ports until ready(process) (it answers, from its own socket) or it fails.

    A process that died saying PORT_TAKEN lost its port to another between probe and bind: try new ports.
    Returns the process; raises RuntimeError with the last attempt's output otherwise.
    """
    for _ in range(attempts):
        process, output = launch()
        if wait_for(lambda: process.poll() is not None or ready(process), seconds) and process.poll() is None:
            return process
        stop_process(process, patience=10)
        if PORT_TAKEN not in output().lower():
            break
    raise RuntimeError(output())


def parent_pids():
    """{pid: parent pid} of every process now running, from /proc (read as bytes: a name need not be UTF-8)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stat:
                parents[int(entry)] = int(stat.read().rsplit(b')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):       # it ended meanwhile
            pass
    return parents


def descendants(pid, parents=None):
    """Every process descending from `pid` (children, their children, ...)."""
    parents = parent_pids() if parents is None else parents
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, of in parents.items() if of == parent]
        found += kids
        frontier += kids
    return found


def stop_process(process, patience):
    """SIGTERM a process the tests started, then SIGKILL it if it has not ended after `patience` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(patience)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class RunningServer:
    """`python server.py` under Paste on a free loopback port, settings from the environment, run from `cwd`."""

    def __init__(self, base_dir, log_path, preexec_fn=None, cwd=None, **env):
        self.base_dir = base_dir

        self.log = open(log_path, 'w+b')

        def launch():
            self.log.seek(0)
            self.log.truncate()
            self.port = free_port()
            environment = dict(os.environ, HOST='127.0.0.1', PORT=str(self.port), BASE_DIR=str(base_dir),
                               SERVER_NAME='127.0.0.1', SERVER_PORT=str(self.port), KEY=KEY)
            environment.update(env)
            environment = {name: value for name, value in environment.items() if value is not None}
            self.process = subprocess.Popen([sys.executable, SERVER_SCRIPT], cwd=cwd or PROJECT, env=environment,
                                            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
            return self.process, self.output
        try:
            started(launch, self._answers, 30)
        except RuntimeError as failure:
            self.log.close()
            raise RuntimeError(f'server did not start: {failure}') from None
        wait_for(lambda: self.client_connections() == 0, 10)     # the check's own connection counted out, so a
                                                                # test's connections meet the caps alone

    def client_connections(self):
        """Connections to the server's port that its process still holds (its listening socket left out)."""
        with open('/proc/net/tcp') as rows:
            inodes = {f'socket:[{fields[9]}]' for fields in map(str.split, rows)
                      if fields[1].endswith(f':{self.port:04X}') and fields[3] != '0A'}
        held = 0
        for fd in os.listdir(f'/proc/{self.process.pid}/fd'):
            with contextlib.suppress(FileNotFoundError):           # closed while we looked
                held += os.readlink(f'/proc/{self.process.pid}/fd/{fd}') in inodes
        return held

    def _answers(self, process):
        """True once our own process listens on the port and answers GET / there."""
        if not holds_listener(process.pid, self.port):
            return False
        try:
            return self.request('GET', '/')[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, headers=None, timeout=60, source='127.0.0.1'):
        """(status, headers, body) of one HTTP request from the loopback address `source`."""
        return exchange(http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout, source_address=(source, 0)),
                        method, path, body, headers)

    def output(self):
        self.log.seek(0)
        return self.log.read().decode('utf-8', 'replace')

    def stop(self):
        stop_process(self.process, patience=10)
        self.log.close()


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_SCRIPT = os.path.join(PROJECT, 'server.py')


def exchange(connection, method, path, body=None, headers=None):
    """(status, headers, body) of one request on a fresh connection, closed afterwards."""
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def launch_chromium(playwright):
    """Debian's headless Chromium through playwright: no sandbox (the tests may run as root), no calls home."""
    return playwright.chromium.launch(executable_path='/usr/bin/chromium', args=CHROMIUM_ARGS)


def start_nginx(folder, name, http_block, events=''):
    """nginx run from `folder` with `http_block` inside http {} (and `events` inside events {}); stopped by the
    caller through the process."""
    user = 'user root;' if os.geteuid() == 0 else ''
    temporary = ' '.join(f'{kind}_temp_path {folder}/{name}-{kind};'
                         for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
    (folder / f'{name}.conf').write_text(
        f'{user} pid {folder}/{name}.pid; error_log {folder}/{name}-error.log; worker_processes 2;\n'
        f'events {{ {events} }}\nhttp {{ include /etc/nginx/mime.types; access_log off; {temporary}\n{http_block}\n}}\n')
    return subprocess.Popen(['nginx', '-p', str(folder), '-c', str(folder / f'{name}.conf'), '-g', 'daemon off;'],
                            stderr=subprocess.DEVNULL)


class LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that names `host` in the handshake (SNI), the Host header and the certificate check."""

    def connect(self):
        self.sock = self._context.wrap_socket(socket.create_connection(('127.0.0.1', self.port), self.timeout),
                                              server_hostname=self.host)


class Nginx:
    """nginx on loopback with deploy/nginx.conf, its ports, certificate, name and folder swapped for the test's.

    `changes` maps more exact strings of the file to what the test runs instead (e.g. shorter timeouts)."""

    name = 'localhost'

    def __init__(self, folder, upstream_port, attachments, changes=None):
        self.folder = folder
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj',
                        f'/CN={self.name}', '-addext', f'subjectAltName=DNS:{self.name}', '-keyout',
                        str(folder / 'key.pem'), '-out', str(folder / 'cert.pem')],
                       check=True, capture_output=True, timeout=60)
        with open(os.path.join(PROJECT, 'deploy', 'nginx.conf')) as example:
            template = example.read()
        for old, new in (changes or {}).items():
            assert old in template, f'deploy/nginx.conf no longer says {old!r}'
            template = template.replace(old, new)
        error_log = folder / 'proxy-error.log'

        def launch():
            self.https, self.http = free_port(), free_port()
            site = (template
                    .replace('server 127.0.0.1:8080;', f'server 127.0.0.1:{upstream_port};')
                    .replace('listen 443 ssl', f'listen 127.0.0.1:{self.https} ssl')
                    .replace('listen 80', f'listen 127.0.0.1:{self.http}')
                    .replace('server_name assets.museum.org;', f'server_name {self.name};')
                    .replace('/etc/ssl/certs/assets.museum.org.pem', str(folder / 'cert.pem'))
                    .replace('/etc/ssl/private/assets.museum.org.key', str(folder / 'key.pem'))
                    .replace('alias /home/specify/attachments/;', f'alias {attachments}/;'))
            error_log.unlink(missing_ok=True)
            self.process = start_nginx(folder, 'proxy', site)
            return self.process, lambda: error_log.read_text() if error_log.exists() else ''
        try:
            started(launch, self._answers, 20)
        except RuntimeError as failure:
            raise RuntimeError(f'nginx did not start: {failure}') from None

    def _answers(self, process):
        """True once our own nginx listens on both ports and answers GET / over HTTPS."""
        if not (holds_listener(process.pid, self.https) and holds_listener(process.pid, self.http)):
            return False
        try:
            return self.request('GET', '/')[0] == 200
        except OSError:
            return False

    def context(self):
        """A TLS client context that trusts this nginx's certificate."""
        return ssl.create_default_context(cafile=str(self.folder / 'cert.pem'))

    def connection(self, timeout=120):
        return LoopbackHTTPS(self.name, self.https, context=self.context(), timeout=timeout)

    def request(self, method, path, body=None, headers=None):
        return exchange(self.connection(), method, path, body, headers)

    def stop(self):
        stop_process(self.process, patience=10)


WEED = os.path.join(os.path.dirname(sys.executable), 'weed')


def free_ports(count):
    """Free loopback ports whose +10000 (SeaweedFS's gRPC port) is free too, both below the ephemeral ports
    (32768 on): a readiness probe of a port nobody listens on yet could otherwise connect to itself."""
    ports, draw = [], random.SystemRandom()      # not the seeded `random`: pytest-randomly makes it repeat
    while len(ports) < count:
        port = draw.randint(20000, 22700)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(('127.0.0.1', candidate))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


class SeaweedFS:
    """`weed server -s3` on free loopback ports with its data in `folder`; stopped by its own pid."""

    bucket = 'attachments'

    def __init__(self, folder):
        self.folder = folder

        def on_new_ports():
            self.master, self.volume, self.filer, self.s3 = free_ports(4)
            self.endpoint = f'http://127.0.0.1:{self.s3}'
            return self._launch()
        self._start(on_new_ports, attempts=5)

    def start(self):
        """Start again after stop(), on the same ports (clients keep the endpoint)."""
        self._start(self._launch, attempts=1)

    def _start(self, launch, attempts):
        try:
            started(launch, self._bucket_ready, 90, attempts)
        except RuntimeError:
            raise RuntimeError('SeaweedFS did not start; see ' + str(self.folder / 'weed.log')) from None

    def _launch(self):
        """(process, this start's output) of `weed server` on the chosen ports; its log is kept across starts."""
        with open(self.folder / 'weed.log', 'ab') as log:
            begin = log.tell()
            self.process = subprocess.Popen(
                [WEED, 'server', '-ip=127.0.0.1', '-ip.bind=127.0.0.1', f'-dir={self.folder}',
                 f'-master.port={self.master}', f'-volume.port={self.volume}', f'-filer.port={self.filer}',
                 '-s3', f'-s3.port={self.s3}', '-s3.port.iceberg=0', '-s3.port.lance=0',
                 '-master.telemetry=false', '-volume.max=50'],
                stdout=log, stderr=subprocess.STDOUT)

        def output():
            with open(self.folder / 'weed.log', 'rb') as log:
                log.seek(begin)
                return log.read().decode('utf-8', 'replace')
        return self.process, output

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client('s3', endpoint_url=self.endpoint, region_name='us-east-1',
                            aws_access_key_id='any', aws_secret_access_key='any',
                            config=Config(s3={'addressing_style': 'path'}, retries={'max_attempts': 1},
                                          request_checksum_calculation='when_required'))

    def _bucket_ready(self, process):
        """True once our own process listens on the S3 port, the bucket exists and an object reads back."""
        if not holds_listener(process.pid, self.s3):
            return False
        client = self.client()
        try:
            try:
                client.create_bucket(Bucket=self.bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=self.bucket, Key='probe', Body=b'ready')
            return client.get_object(Bucket=self.bucket, Key='probe')['Body'].read() == b'ready'
        except Exception:
            time.sleep(0.5)
            return False

    def settings(self, prefix):
        return {'STORAGE': 's3', 'S3_ENDPOINT_URL': self.endpoint, 'S3_BUCKET': self.bucket,
                'S3_PREFIX': prefix, 'S3_ADDRESSING_STYLE': 'path', 'S3_REGION': 'us-east-1',
                'S3_ACCESS_KEY_ID': 'any', 'S3_SECRET_ACCESS_KEY': 'any'}

    def stop(self):
        stop_process(self.process, patience=3)      # it may ignore SIGTERM


def pytest_terminal_summary(terminalreporter, config):
    """Say which random order ran (pytest -q hides pytest-randomly's header), so a failure can be replayed."""
    seed = getattr(config.option, 'randomly_seed', None)
    if isinstance(seed, int):
        terminalreporter.write_line(f'random order: replay it with --randomly-seed={seed}')
