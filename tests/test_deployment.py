"""Deployment as institutions run it: the Docker files checked statically, nginx in front for real
(HTTPS, large uploads, X-Accel-Redirect offload), the X-Sendfile offload's answers, and a real browser
uploading cross-origin."""

import base64
import ctypes
import errno
import http.client
import json
import os
import platform
import re
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlencode

import pytest
import yaml

from harness.browser import launch_chromium
from harness.client import KEY, multipart_body
from harness.images import image_info, make_image
from harness.nginx import Nginx
from harness.processes import PROJECT, wait_for
from harness.servers import RunningServer
from config import load_config
from tokens import make_token

pytestmark = pytest.mark.disk_only


def project_file(name):
    with open(os.path.join(PROJECT, name)) as f:
        return f.read()


# --- Docker, compose, systemd: static checks -------------------------------------------------

def test_the_dockerfile_passes_hadolint():
    linter = os.path.join(os.path.dirname(sys.executable), 'hadolint')
    result = subprocess.run([linter, os.path.join(PROJECT, 'Dockerfile')], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_the_same_system_packages_as_the_readme_setup():
    dockerfile, readme = project_file('Dockerfile'), project_file('README.md')
    assert 'COPY deploy/packages.txt deploy/install-packages.sh' in dockerfile
    assert 'install-packages.sh /tmp/deploy/packages.txt' in dockerfile
    assert 'sh deploy/install-packages.sh && make run' in readme
    assert 'sh deploy/install-packages.sh deploy/packages.txt' in project_file('Makefile')
    packages = [line for line in project_file('deploy/packages.txt').split('\n') if line and not line.startswith('#')]
    assert {'imagemagick', 'ghostscript', 'libheif1', 'python3-venv'} <= set(packages)


def test_the_image_runs_python_server_py_as_the_specify_user_with_attachments_in_a_volume():
    dockerfile = project_file('Dockerfile')
    assert re.search(r'useradd --uid 999 --gid 999 .*specify', dockerfile)
    assert re.search(r'^USER 999:999$', dockerfile, re.M)
    assert 'VOLUME /home/specify/attachments' in dockerfile
    assert 'BASE_DIR=/home/specify/attachments' in dockerfile and 'PORT=8080' in dockerfile
    assert re.search(r'^CMD \["/opt/venv/bin/python", "server.py"\]$', dockerfile, re.M)
    assert re.search(r'^HEALTHCHECK .*\n?.*/health', dockerfile, re.M)
    copied = ' '.join(re.findall(r'^COPY (.*)$', dockerfile, re.M))
    for source in ('*.py', 'views', 'requirements.txt'):     # *.py: every module of tests/test_layout.py
        assert source in copied.split()


def test_compose_reads_the_names_existing_deployments_use():
    compose = yaml.safe_load(project_file('docker-compose.yml'))
    service = compose['services']['asset-server']
    assert {'SERVER_NAME', 'SERVER_PORT', 'ATTACHMENT_KEY', 'DEBUG_MODE'} <= set(service['environment'])
    assert 'attachments:/home/specify/attachments' in service['volumes']
    assert service['ports'] == ['8080:8080']
    assert compose['services']['seaweedfs']['profiles'] == ['s3']


def test_the_names_compose_sets_are_the_ones_the_server_reads(tmp_path):
    environment = yaml.safe_load(project_file('docker-compose.yml'))['services']['asset-server']['environment']
    environment = {name: str(value).replace('${ATTACHMENT_KEY:-}', 'from-compose') for name, value in environment.items()}
    config = load_config(environ=dict(environment, BASE_DIR=str(tmp_path)))
    assert (config.SERVER_NAME, config.SERVER_PORT, config.KEY, config.DEBUG) == ('localhost', 8080, 'from-compose', False)


def test_the_readme_documents_what_the_deployment_files_do():
    readme = project_file('docs/deployment.md')
    for fact in ('/home/specify/attachments', '`specify`', 'docker compose', 'deploy/nginx.conf',
                 'deploy/web-asset-server.service', 'authbind', 'FILE_OFFLOAD', '/health'):
        assert fact in readme


UNIT = 'deploy/web-asset-server.service'


def unit_settings(text):
    """{directive: [values]} of a unit's uncommented [Service] lines, in order."""
    settings, section = {}, None
    for line in text.split('\n'):
        if line.startswith('['):
            section = line
        elif section == '[Service]' and '=' in line and not line.startswith('#'):
            name, value = line.split('=', 1)
            settings.setdefault(name, []).append(value)
    return settings


def test_the_systemd_unit_runs_server_py_from_its_folder():
    unit = project_file(UNIT)
    working = re.search(r'^WorkingDirectory=(.*)$', unit, re.M).group(1)
    assert re.search(rf'^ExecStart={re.escape(working)}/\.venv/bin/python server\.py$', unit, re.M)
    assert re.search(r'^User=specify$', unit, re.M)


def test_the_systemd_unit_offers_port_80_by_capability_and_authbind_only_without_no_new_privileges():
    unit = project_file(UNIT)
    capability = 'CAP_NET_BIND_SERVICE'
    assert re.search(rf'^# AmbientCapabilities={capability}\n# CapabilityBoundingSet={capability}$', unit, re.M)
    assert re.search(r'^# Or authbind .*NoNewPrivileges=no.*\n# ExecStart=/usr/bin/authbind --deep ', unit, re.M)


SANDBOX = {
    'Environment': ['HOST=127.0.0.1 PORT=8080 BASE_DIR=/home/specify/attachments'],
    'CapabilityBoundingSet': [''], 'NoNewPrivileges': ['yes'], 'ProtectSystem': ['strict'],
    'ProtectHome': ['read-only'], 'ReadWritePaths': ['/home/specify/attachments'], 'PrivateTmp': ['yes'],
    'PrivateDevices': ['yes'], 'ProtectKernelTunables': ['yes'], 'ProtectKernelModules': ['yes'],
    'ProtectKernelLogs': ['yes'], 'ProtectControlGroups': ['yes'],
    'RestrictAddressFamilies': ['AF_INET AF_INET6 AF_UNIX'], 'RestrictNamespaces': ['yes'],
    'LockPersonality': ['yes'], 'MemoryDenyWriteExecute': ['yes'], 'SystemCallArchitectures': ['native'],
    'SystemCallFilter': ['@system-service', '~@privileged'],
    'MemoryMax': ['3G'], 'TasksMax': ['256'], 'LimitNOFILE': ['4096'],
}


def test_the_systemd_unit_listens_on_loopback_and_sandboxes_the_server():
    settings = unit_settings(project_file(UNIT))
    assert {name: settings.get(name) for name in SANDBOX} == SANDBOX


def test_the_unit_writes_only_the_folder_nginx_offloads_from():
    settings = unit_settings(project_file(UNIT))
    alias = re.search(r'alias (.*)/;', project_file('deploy/nginx.conf')).group(1)
    assert settings['ReadWritePaths'] == [alias] and f'BASE_DIR={alias}' in settings['Environment'][0].split()


def installed_unit(folder, text=None):
    """The unit as installed here: its paths pointed at this checkout and this Python, in `folder`."""
    text = (text or project_file(UNIT)).replace('/opt/web-asset-server/.venv/bin/python', sys.executable)
    path = folder / 'web-asset-server.service'
    path.write_text(text.replace('/opt/web-asset-server', PROJECT))
    return path


def exposure(unit):
    """systemd-analyze's overall exposure score of a unit file (0 safest, 10 most exposed)."""
    result = subprocess.run(['systemd-analyze', 'security', '--offline=yes', '--no-pager', str(unit)],
                            capture_output=True, text=True, timeout=60)
    return float(re.search(r'Overall exposure level for .*: ([0-9.]+)', result.stdout).group(1))


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    result = subprocess.run(['systemd-analyze', 'verify', str(installed_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, '')


def test_the_systemd_unit_exposure_score_is_below_2(tmp_path):
    assert exposure(installed_unit(tmp_path)) < 2


def test_the_port_80_variant_of_the_unit_verifies_and_stays_below_2(tmp_path):
    text = project_file(UNIT).replace('# AmbientCapabilities=', 'AmbientCapabilities=').replace(
        '# CapabilityBoundingSet=CAP', 'CapabilityBoundingSet=CAP').replace('PORT=8080', 'PORT=80')
    unit = installed_unit(tmp_path, text)
    result = subprocess.run(['systemd-analyze', 'verify', str(unit)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr, exposure(unit) < 2) == (0, '', True)


# MemoryDenyWriteExecute=yes as systemd 252 builds it: a seccomp filter refusing (EPERM) mmap with
# PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC and shmat with SHM_EXEC (x86-64 numbers;
# the third argument's low word sits at byte 32 of seccomp_data). Installing it needs no_new_privs,
# which is NoNewPrivileges=yes, so the server runs here under both, its children included.

def seccomp_program(steps):
    """Classic BPF bytes from (label, code, k, label if true, label if false) steps."""
    where = {step[0]: n for n, step in enumerate(steps) if step[0]}
    return b''.join(struct.pack('HBBI', code, where[yes] - n - 1 if yes else 0, where[no] - n - 1 if no else 0, k)
                    for n, (_, code, k, yes, no) in enumerate(steps))


LOAD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06           # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_ALU|AND|K, BPF_RET|K
NO_WRITE_EXECUTE = seccomp_program([
    (None, LOAD, 4, None, None), (None, JEQ, 0xC000003E, None, 'allow'),     # arch x86-64, else allow
    (None, LOAD, 0, None, None),                                             # the system call's number
    (None, JEQ, 9, 'mmap', None), (None, JEQ, 10, 'exec', None), (None, JEQ, 329, 'exec', None),
    (None, JEQ, 30, 'shmat', None), (None, RET, 0x7fff0000, None, None),
    ('mmap', LOAD, 32, None, None), (None, AND, 0x6, None, None), (None, JEQ, 0x6, 'refuse', 'allow'),
    ('exec', LOAD, 32, None, None), (None, AND, 0x4, None, None), (None, JEQ, 0x4, 'refuse', 'allow'),
    ('shmat', LOAD, 32, None, None), (None, AND, 0o100000, None, None), (None, JEQ, 0o100000, 'refuse', 'allow'),
    ('allow', RET, 0x7fff0000, None, None), ('refuse', RET, 0x00050000 | errno.EPERM, None, None)])


class SockFprog(ctypes.Structure):
    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_char_p)]


def deny_write_execute():
    """In a child before exec: no_new_privs (PR_SET_NO_NEW_PRIVS), then the filter (PR_SET_SECCOMP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    program = SockFprog(len(NO_WRITE_EXECUTE) // 8, NO_WRITE_EXECUTE)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(program), 0, 0):
        raise OSError(ctypes.get_errno(), 'the seccomp filter was not installed')


needs_x86_64 = pytest.mark.skipif(platform.machine() != 'x86_64', reason='the filter uses x86-64 call numbers')


@needs_x86_64
def test_the_write_execute_filter_refuses_writable_executable_memory():
    result = subprocess.run([sys.executable, '-c', 'import mmap; mmap.mmap(-1, 4096, prot=7)'], capture_output=True,
                            text=True, timeout=60, preexec_fn=deny_write_execute)
    assert 'PermissionError: [Errno 1]' in result.stderr


@pytest.fixture(scope='module')
def sandboxed(tmp_path_factory):
    """The server as the unit runs it: no_new_privs and no writable executable memory."""
    folder = tmp_path_factory.mktemp('sandboxed')
    web = RunningServer(folder / 'attachments', folder / 'server.log', preexec_fn=deny_write_execute,
                        PREGENERATE_SCALE='none')
    yield web
    web.stop()


def sandboxed_upload(web, name, data):
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', make_token(KEY, name))])
    return web.request('POST', '/fileupload', body, {'Content-Type': content_type})[0]


def source_file(kind, tmp_path, jpeg):
    """A JPEG, a PDF made by Ghostscript or a HEIC made by libheif: each thumbnailer's input."""
    if kind == 'jpg':
        return jpeg
    if kind == 'pdf':
        (tmp_path / 'in.ps').write_text('%!PS\n1 0 0 setrgbcolor 50 50 100 100 rectfill showpage\n')
        command = ['gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=pdfwrite', '-o', str(tmp_path / 'out.pdf'),
                   str(tmp_path / 'in.ps')]
        output = tmp_path / 'out.pdf'
    else:
        (tmp_path / 'in.jpg').write_bytes(jpeg)
        command, output = ['heif-enc', '-q', '40', str(tmp_path / 'in.jpg'), '-o', str(tmp_path / 'out.heic')], \
            tmp_path / 'out.heic'
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return output.read_bytes()


@needs_x86_64
@pytest.mark.parametrize('kind, thumbnail_format', [('jpg', 'JPEG'), ('pdf', 'PNG'), ('heic', 'PNG')])
def test_thumbnails_are_made_without_writable_executable_memory(sandboxed, tmp_path, jpeg, kind, thumbnail_format):
    name = f'sandboxed.{kind}'
    assert sandboxed_upload(sandboxed, name, source_file(kind, tmp_path, jpeg)) == 200
    status, _, body = sandboxed.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'T', 'scale': 64}))
    assert (status, image_info(body, tmp_path)[0]) == (200, thumbnail_format)


@needs_x86_64
@pytest.mark.parametrize('kind', ['jpg', 'pdf', 'heic'])
def test_iiif_pyramids_and_tiles_are_made_without_writable_executable_memory(sandboxed, tmp_path, jpeg, kind):
    name = f'deep zoom.{kind}'
    assert sandboxed_upload(sandboxed, name, source_file(kind, tmp_path, jpeg)) == 200
    status, _, body = sandboxed.request('GET', f'/iiif/3/{quote(name)}/full/64,/0/default.jpg')
    assert (status, image_info(body, tmp_path)[:2]) == (200, ('JPEG', 64)), body[:200]


@needs_x86_64
def test_metadata_is_read_without_writable_executable_memory(sandboxed, jpeg):
    assert sandboxed_upload(sandboxed, 'exif.jpg', jpeg) == 200
    status, _, body = sandboxed.request('GET', '/getmetadata?' + urlencode({'filename': 'exif.jpg', 'dt': 'json'}))
    assert (status, type(json.loads(body))) == (200, list)


# --- nginx in front ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def proxied(tmp_path_factory):
    """The server (FILE_OFFLOAD=nginx, trusting the proxy's headers) behind nginx with HTTPS."""
    folder = tmp_path_factory.mktemp('proxied')
    attachments = folder / 'attachments'
    web = RunningServer(attachments, folder / 'server.log', FILE_OFFLOAD='nginx', TRUST_PROXY_HEADERS='true',
                        SERVER_NAME='internal', SERVER_PORT='8080')
    proxy = Nginx(folder, web.port, attachments)
    yield proxy, web
    proxy.stop()
    web.stop()


def upload_through(proxy, name, data, token=None):
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', token or make_token(KEY, name))])
    return proxy.request('POST', '/fileupload', body, {'Content-Type': content_type})


def test_discovery_through_the_proxy_says_https_without_rewriting(proxied):
    proxy, _web = proxied
    body = proxy.request('GET', '/web_asset_store.xml')[2].decode()
    assert f'<url type="read">https://{proxy.name}:{proxy.https}/fileget</url>' in body


def test_a_200_mb_upload_passes_the_proxy(proxied):
    proxy, web = proxied
    data = os.urandom(1024 * 1024) * 200
    status, _, body = upload_through(proxy, 'scan-200mb.tif', data)
    assert (status, body) == (200, b'Ok.')
    assert (web.base_dir / 'originals' / 'scan-200mb.tif').stat().st_size == len(data)


def nginx_etag(path):
    """The ETag nginx makes for a file it sends itself: hex mtime, hex size (the server's differs)."""
    info = os.stat(path)
    return f'"{int(info.st_mtime):x}-{info.st_size:x}"'


def test_fileget_behind_nginx_is_answered_by_the_server_with_x_accel_redirect_and_no_body(proxied, jpeg):
    proxy, web = proxied
    upload_through(proxy, 'Käfer 1.jpg', jpeg)
    status, headers, body = web.request('GET', '/fileget?' + urlencode({'filename': 'Käfer 1.jpg', 'type': 'O'}))
    assert (status, body) == (200, b'')
    assert headers['X-Accel-Redirect'] == '/protected-attachments/originals/K%C3%A4fer%201.jpg'
    assert headers['Content-Type'] == 'image/jpeg'


def test_offloaded_fileget_is_sent_by_nginx_with_identical_bytes_range_and_the_servers_headers(proxied, jpeg):
    proxy, web = proxied
    name = 'Käfer 2.jpg'
    upload_through(proxy, name, jpeg)
    query = '/fileget?' + urlencode({'filename': name, 'type': 'O'})
    status, headers, body = proxy.request('GET', query)
    assert (status, body) == (200, jpeg)
    assert headers['ETag'] == nginx_etag(web.base_dir / 'originals' / name)      # nginx read the file itself
    assert 'X-Accel-Redirect' not in headers
    assert headers['Content-Type'] == 'image/jpeg' and 'X-Timestamp' in headers
    assert headers['Access-Control-Allow-Origin'] == '*'
    status, headers, body = proxy.request('GET', query, headers={'Range': 'bytes=10-19'})
    assert (status, body, headers['Content-Range']) == (206, jpeg[10:20], f'bytes 10-19/{len(jpeg)}')


def test_offloaded_thumbnails_are_made_by_the_server_then_sent_by_nginx(proxied, tmp_path, jpeg):
    proxy, web = proxied
    upload_through(proxy, 'thumb.jpg', jpeg)
    query = '/fileget?' + urlencode({'filename': 'thumb.jpg', 'type': 'T', 'scale': 123})
    status, headers, body = proxy.request('GET', query)
    assert (status, image_info(body, tmp_path)) == (200, ('JPEG', 123, 82))
    assert headers['ETag'] == nginx_etag(web.base_dir / 'thumbnails' / 'thumb_123.jpg')
    status, headers, body = web.request('GET', query)
    assert (status, body, headers['X-Accel-Redirect']) == (200, b'', '/protected-attachments/thumbnails/thumb_123.jpg')


@pytest.mark.parametrize('case, expected', [('missing file', 404), ('bad token', 403), ('unknown path', 404)])
def test_errors_through_the_proxy_keep_x_timestamp_and_cors(proxied, jpeg, case, expected):
    proxy, _web = proxied
    status, headers, _ = {
        'missing file': lambda: proxy.request('GET', '/fileget?filename=none.jpg&type=O'),
        'bad token': lambda: upload_through(proxy, 'a.jpg', jpeg, token='0:0'),
        'unknown path': lambda: proxy.request('GET', '/nowhere'),
    }[case]()
    assert status == expected
    assert 'X-Timestamp' in headers and headers['Access-Control-Allow-Origin'] == '*'


def test_the_offload_never_skips_the_checks(proxied, jpeg):
    proxy, _web = proxied
    assert proxy.request('GET', '/protected-attachments/originals/thumb.jpg')[0] == 404
    assert proxy.request('GET', '/fileget?filename=../settings.py&type=O')[0] == 400


def test_health_says_storage_and_thumbnails_are_usable_without_a_key(proxied):
    proxy, _web = proxied
    status, headers, body = proxy.request('GET', '/health')
    assert (status, json.loads(body)) == (200, {'storage': 'ok', 'thumbnails': 'ok'})


def test_health_is_503_when_the_attachments_folder_is_gone(make_client):
    client = make_client()
    shutil.rmtree(client.base)
    answer = client.get('/health', {}, status=503)
    assert answer.json['storage'] == 'not writable' and client.base not in answer.text



# --- nginx's limits: hosts, TLS, connections, deadlines ------------------------------------------

HEADER_TIMEOUT = 2      # the tuned proxy's client_header_timeout (deploy/nginx.conf says 10s)
SITE_LIMIT = 8          # the tuned proxy's per-site connection limit (deploy/nginx.conf says 256)


@pytest.fixture(scope='module')
def tuned(proxied, tmp_path_factory):
    """A second nginx from deploy/nginx.conf in front of the same server, with a short header timeout,
    a small per-site limit and ciphers that would allow TLS 1.1, so ssl_protocols alone must refuse it."""
    _proxy, web = proxied
    folder = tmp_path_factory.mktemp('tuned')
    proxy = Nginx(folder, web.port, web.base_dir, changes={
        'client_header_timeout 10s;': f'client_header_timeout {HEADER_TIMEOUT}s;',
        'limit_conn per_site 256;': f'limit_conn per_site {SITE_LIMIT};',
        'ssl_reject_handshake on;': 'ssl_reject_handshake on; ssl_ciphers DEFAULT:@SECLEVEL=0;',
        'ssl_certificate_key /etc/ssl/private/assets.museum.org.key;':
            'ssl_certificate_key /etc/ssl/private/assets.museum.org.key; ssl_ciphers DEFAULT:@SECLEVEL=0;'})
    yield proxy
    proxy.stop()


def tls_socket(proxy, source='127.0.0.1', name=None, context=None):
    """A TLS connection to the proxy from loopback address `source`, naming `name` in the handshake."""
    plain = socket.create_connection(('127.0.0.1', proxy.https), timeout=30, source_address=(source, 0))
    return (context or proxy.context()).wrap_socket(plain, server_hostname=name or proxy.name)


DELETE_BODY = b'filename=held.jpg&coll=Fish&token=0%3A0'


def held_request(proxy, source='127.0.0.1'):
    """A connection whose POST /filedelete header is sent and whose body is still arriving."""
    connection = tls_socket(proxy, source)
    connection.sendall(b'POST /filedelete HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n'
                       b'Content-Type: application/x-www-form-urlencoded\r\n'
                       b'Content-Length: %d\r\n\r\n' % len(DELETE_BODY) + DELETE_BODY[:10])
    return connection


def finished(connection):
    """Send the rest of a held request's body; the status it is answered with."""
    connection.sendall(DELETE_BODY[10:])
    answer = http.client.HTTPResponse(connection)
    answer.begin()
    connection.close()
    return answer.status


def discovery_status(proxy, source):
    """Status of GET /web_asset_store.xml from loopback address `source`."""
    connection = tls_socket(proxy, source)
    try:
        connection.sendall(b'GET /web_asset_store.xml HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n')
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        return answer.status
    finally:
        connection.close()


def test_one_address_gets_503_beyond_32_requests_at_once_while_the_others_are_served(proxied):
    proxy, _web = proxied
    held = [held_request(proxy) for _ in range(32)]
    try:
        assert wait_for(lambda: discovery_status(proxy, '127.0.0.1') == 503, 10)
        assert discovery_status(proxy, '127.0.0.2') == 200               # another address is served
        assert [finished(connection) for connection in held] == [403] * 32
    finally:
        for connection in held:
            connection.close()
    assert wait_for(lambda: discovery_status(proxy, '127.0.0.1') == 200, 10)


def test_the_site_gets_503_beyond_its_total_of_requests_at_once_while_those_are_served(tuned):
    held = [held_request(tuned, f'127.0.0.{2 + n}') for n in range(SITE_LIMIT)]       # one per address
    try:
        assert wait_for(lambda: discovery_status(tuned, '127.0.1.1') == 503, 10)
        assert [finished(connection) for connection in held] == [403] * SITE_LIMIT
    finally:
        for connection in held:
            connection.close()
    assert wait_for(lambda: discovery_status(tuned, '127.0.1.1') == 200, 10)


def test_a_client_trickling_its_request_header_is_cut_off_after_client_header_timeout(tuned):
    connection = tls_socket(tuned)
    connection.sendall(b'GET /web_asset_store.xml HTTP/1.1\r\nHost: localhost\r\nX-Padding: ')
    start, closed = time.monotonic(), False
    try:
        while not closed and time.monotonic() - start < HEADER_TIMEOUT + 10:
            if select.select([connection], [], [], 0.2)[0]:           # never silent for more than 0.2 s
                closed = connection.recv(1024) == b''
            else:
                connection.sendall(b'a')
    except (ConnectionError, ssl.SSLError):
        closed = True
    finally:
        connection.close()
    assert closed and time.monotonic() - start > HEADER_TIMEOUT * 0.9


@pytest.mark.parametrize('port', ['https', 'http'])
def test_a_request_naming_another_host_is_closed_without_an_answer(proxied, port):
    proxy, _web = proxied
    if port == 'https':
        connection = proxy.connection(timeout=30)
    else:
        connection = http.client.HTTPConnection('127.0.0.1', proxy.http, timeout=30)
    connection.request('GET', '/web_asset_store.xml', headers={'Host': 'evil.example'})
    with pytest.raises(http.client.RemoteDisconnected):
        connection.getresponse()
    connection.close()


def test_a_handshake_naming_another_host_is_refused(proxied):
    proxy, _web = proxied
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(ssl.SSLError, match='UNRECOGNIZED_NAME'):
        tls_socket(proxy, name='evil.example', context=context)


def test_plain_http_redirects_to_https_at_the_configured_name(proxied):
    proxy, _web = proxied
    status, headers, _ = exchange_plain(proxy, '/web_asset_store.xml?x=1')
    assert (status, headers['Location']) == (301, f'https://{proxy.name}/web_asset_store.xml?x=1')


def exchange_plain(proxy, path):
    connection = http.client.HTTPConnection('127.0.0.1', proxy.http, timeout=30)
    try:
        connection.request('GET', path, headers={'Host': proxy.name})
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


@pytest.mark.parametrize('path, expected', [('/web_asset_store.xml', 200), ('/nowhere', 404),
                                            ('/fileget?filename=hsts.jpg&type=O', 200)])    # the last sent by nginx
def test_every_https_answer_carries_hsts(proxied, jpeg, path, expected):
    proxy, _web = proxied
    upload_through(proxy, 'hsts.jpg', jpeg)
    status, headers, _ = proxy.request('GET', path)
    assert (status, headers['Strict-Transport-Security']) == (expected, 'max-age=63072000')


def tls_context(proxy, version):
    """A client context that offers only TLS `version`, at OpenSSL's lowest security level."""
    context = proxy.context()
    context.minimum_version = context.maximum_version = version
    context.set_ciphers('DEFAULT:@SECLEVEL=0')
    return context


@pytest.mark.filterwarnings('ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning')
def test_a_tls_1_1_handshake_is_refused(tuned):
    with pytest.raises(ssl.SSLError, match='PROTOCOL_VERSION'):
        tls_socket(tuned, context=tls_context(tuned, ssl.TLSVersion.TLSv1_1))


@pytest.mark.parametrize('version', [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=['1.2', '1.3'])
def test_tls_1_2_and_1_3_handshakes_succeed(tuned, version):
    with tls_socket(tuned, context=tls_context(tuned, version)) as connection:
        assert connection.version() == version.name.replace('v1_', 'v1.')


def paced(data, rate, step=0.1):
    """`data` in pieces sent `rate` bytes per second, like a slow link (the pause paces, it waits for nothing)."""
    piece = int(rate * step)
    for start in range(0, len(data), piece):
        yield data[start:start + piece]
        time.sleep(step)


def test_an_upload_at_1_mbit_per_second_passes_the_proxy(proxied):
    proxy, web = proxied
    data = os.urandom(600 * 1024)
    content_type, body = multipart_body([('file', 'slow.bin', data), ('store', 'slow.bin'), ('type', 'O'),
                                         ('coll', 'Fish'), ('token', make_token(KEY, 'slow.bin'))])
    start = time.monotonic()
    status, _, answer = proxy.request('POST', '/fileupload', paced(body, 125 * 1024),
                                      {'Content-Type': content_type, 'Content-Length': str(len(body))})
    assert (status, answer, time.monotonic() - start > 4) == (200, b'Ok.', True)
    assert (web.base_dir / 'originals' / 'slow.bin').read_bytes() == data

# --- The offload answers themselves (nginx: X-Accel-Redirect, Apache: X-Sendfile) ----------------

OFFLOAD_HEADER = {'nginx': 'X-Accel-Redirect', 'apache': 'X-Sendfile'}


def test_apache_offload_answers_x_sendfile_with_the_originals_path_and_no_body(make_client, jpeg):
    client = make_client(FILE_OFFLOAD='apache')
    client.upload('Käfer 1.jpg', jpeg)
    answer = client.fileget('Käfer 1.jpg')
    assert (answer.status_int, answer.body) == (200, b'')
    assert answer.headers['X-Sendfile'].encode('latin-1') == client.path('originals', 'Käfer 1.jpg').encode()  # bytes on the wire
    assert answer.headers['Content-Type'] == 'image/jpeg'
    assert answer.headers['X-Content-Type-Options'] == 'nosniff'
    assert 'Content-Security-Policy' not in answer.headers and 'X-Accel-Redirect' not in answer.headers


@pytest.mark.parametrize('name, data, mimetype', [('page.html', b'<script>alert(1)</script>', 'text/html'),
                                                   ('drawing.svg', b'<svg onload="alert(1)"/>', 'image/svg+xml')])
@pytest.mark.parametrize('offload', ['nginx', 'apache'])
def test_offloaded_script_capable_files_are_handed_over_sandboxed(make_client, offload, name, data, mimetype):
    client = make_client(FILE_OFFLOAD=offload)
    client.upload(name, data)
    answer = client.fileget(name)
    assert (answer.body, answer.headers['Content-Type']) == (b'', mimetype)
    assert answer.headers['Content-Security-Policy'] == 'sandbox'
    assert OFFLOAD_HEADER[offload] in answer.headers


def test_apache_offload_of_a_thumbnail_names_the_thumbnail_made(make_client, jpeg):
    client = make_client(FILE_OFFLOAD='apache')
    client.upload('thumb.jpg', jpeg)
    answer = client.fileget('thumb.jpg', 'T', scale='123')
    assert (answer.status_int, answer.body) == (200, b'')
    assert answer.headers['X-Sendfile'] == client.path('thumbnails', 'thumb_123.jpg')
    assert answer.headers['Content-Type'] == 'image/jpeg'
    assert os.path.isfile(answer.headers['X-Sendfile'])


def test_nginx_offload_names_the_internal_path_of_a_collections_file_url_quoted(make_client, jpeg):
    client = make_client(FILE_OFFLOAD='nginx', COLLECTION_DIRS={'Fish': 'ichthyology'})
    client.upload('a b#?.jpg', jpeg)
    answer = client.fileget('a b#?.jpg')
    assert answer.headers['X-Accel-Redirect'] == '/protected-attachments/ichthyology/originals/a%20b%23%3F.jpg'


@pytest.mark.parametrize('token', ['none', 'for another file', 'expired'])
@pytest.mark.parametrize('offload', ['nginx', 'apache'])
def test_offloaded_fileget_needing_a_key_is_403_without_a_handover_when_the_token_is_not_valid(
        make_client, jpeg, offload, token):
    client = make_client(FILE_OFFLOAD=offload, REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg)
    client.upload('b.jpg', jpeg)
    params = {'none': {}, 'for another file': {'token': client.token('b.jpg')},
              'expired': {'token': client.token('a.jpg', timestamp=1)}}[token]
    answer = client.fileget('a.jpg', status=403, **params)
    assert 'X-Accel-Redirect' not in answer.headers and 'X-Sendfile' not in answer.headers
    assert b'\xff\xd8' not in answer.body


@pytest.mark.parametrize('offload, expected', [('nginx', '/protected-attachments/originals/a.jpg'),
                                               ('apache', 'originals/a.jpg')])
def test_offloaded_fileget_needing_a_key_hands_over_with_a_valid_token(make_client, jpeg, offload, expected):
    client = make_client(FILE_OFFLOAD=offload, REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg', token=client.token('a.jpg'))
    handover = answer.headers[OFFLOAD_HEADER[offload]]
    assert handover == (expected if offload == 'nginx' else client.path(expected))
    assert answer.body == b''


# --- A real browser ------------------------------------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>upload</title>
<img id="thumb"><script>
function upload(token) {
  return new Promise(done => {
    const bytes = Uint8Array.from(atob(%(image)s), c => c.charCodeAt(0));
    const form = new FormData();                       // Specify 7's order: the file first
    form.append('file', new Blob([bytes], {type: 'image/jpeg'}), 'photo.jpg');
    form.append('store', %(store)s); form.append('type', 'O'); form.append('coll', 'Fish');
    form.append('token', token);
    const xhr = new XMLHttpRequest();
    xhr.upload.addEventListener('progress', () => {});   // a listener makes the browser preflight
    xhr.onloadend = () => done(xhr.status);
    xhr.open('POST', %(server)s + '/fileupload');
    xhr.send(form);
  });
}
function thumbnail() {
  return new Promise(done => {
    const img = document.getElementById('thumb');
    img.onload = () => done(img.naturalWidth);
    img.onerror = () => done(-1);
    img.src = %(server)s + '/fileget?filename=' + encodeURIComponent(%(store)s) + '&type=T&scale=123';
  });
}
</script>"""


def test_a_browser_uploads_cross_origin_sees_the_thumbnail_and_a_403_as_403(tmp_path, jpeg):
    from playwright.sync_api import sync_playwright
    web = RunningServer(tmp_path / 'attachments', tmp_path / 'server.log')
    page_folder = tmp_path / 'site'
    page_folder.mkdir()
    store = 'a9c4e1f0-browser.jpg'
    (page_folder / 'index.html').write_text(PAGE % {
        'image': json.dumps(base64.b64encode(jpeg).decode()), 'store': json.dumps(store),
        'server': json.dumps(f'http://127.0.0.1:{web.port}')})
    site = ThreadingHTTPServer(('127.0.0.1', 0), lambda *a: SimpleHTTPRequestHandler(*a, directory=str(page_folder)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.goto(f'http://localhost:{site.server_address[1]}/index.html')     # another origin
            assert page.evaluate(f'upload({json.dumps(make_token(KEY, store))})') == 200
            assert page.evaluate('thumbnail()') > 0
            assert page.evaluate('upload("0123456789abcdef0123456789abcdef:1")') == 403
            browser.close()
        assert (web.base_dir / 'originals' / store).read_bytes() == jpeg
        assert 'OPTIONS /fileupload 200' in web.output()          # the upload was preflighted
    finally:
        site.shutdown()
        web.stop()


def test_an_offloaded_webp_preview_is_sent_by_nginx_as_webp_with_vary_accept(proxied, tmp_path, jpeg):
    proxy, web = proxied
    upload_through(proxy, 'gallery.jpg', jpeg)
    query = '/fileget?' + urlencode({'filename': 'gallery.jpg', 'type': 'T', 'scale': 123})
    status, headers, body = proxy.request('GET', query, headers={'Accept': 'image/webp,*/*'})
    assert (status, image_info(body, tmp_path), headers['Content-Type']) == (200, ('WEBP', 123, 82), 'image/webp')
    assert headers['Vary'] == 'Accept'
    assert headers['ETag'] == nginx_etag(web.base_dir / 'thumbnails' / 'gallery_123_webp.jpg')


def test_an_offloaded_iiif_tile_is_sent_by_nginx_with_the_servers_cache_control(proxied, tmp_path):
    proxy, web = proxied
    upload_through(proxy, 'sheet.jpg', make_image(tmp_path, 'plasma:', '700x500', 'jpg'))
    tile = '/iiif/3/sheet.jpg/512,0,188,500/188,500/0/default.jpg'
    assert proxy.request('GET', tile)[0] == 200                        # cut by the server, then stored
    status, headers, body = proxy.request('GET', tile)
    assert (status, image_info(body, tmp_path)) == (200, ('JPEG', 188, 500))
    assert headers['ETag'] == nginx_etag(web.base_dir / 'thumbnails' / 'sheet_iiif,512,0,188,500,188,500.jpg')
    assert headers['Cache-Control'] == 'public, max-age=86400' and headers['Access-Control-Allow-Origin'] == '*'
