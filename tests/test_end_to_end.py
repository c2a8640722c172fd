"""`python server.py` under Paste, configured by environment variables, spoken to over real HTTP."""

import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest

import harness.processes
import harness.servers
from harness.client import KEY, multipart_body
from harness.images import image_info
from harness.processes import holds_listener, PROJECT, wait_for
from harness.servers import RunningServer
from tokens import make_token


@pytest.fixture
def running(tmp_path):
    started = []

    def start(**env):
        started.append(RunningServer(tmp_path / 'attachments', tmp_path / f'server{len(started)}.log', **env))
        return started[-1]
    yield start
    for one in started:
        one.stop()


def token(name):
    return make_token(KEY, name)


def test_a_specify_session_over_http_uploads_reads_thumbnails_and_deletes(running, jpeg, tmp_path):
    web = running(COLLECTION_DIRS='{"Fish": "fish"}', REQUIRE_KEY_FOR_GET='true')
    status, headers, body = web.request('GET', '/web_asset_store.xml')
    urls = {url.get('type'): url.text for url in ET.fromstring(body).iter('url')}
    assert urls['read'] == f'http://127.0.0.1:{web.port}/fileget' and 'X-Timestamp' in headers
    assert web.request('GET', '/testkey?' + urlencode({'random': '9', 'token': token('9')}))[0] == 200

    content_type, upload = multipart_body([('file', 'x.jpg', jpeg), ('store', 'a.jpg'), ('type', 'O'),
                                           ('coll', 'Fish'), ('token', token('a.jpg'))])
    assert web.request('POST', '/fileupload', upload, {'Content-Type': content_type})[2] == b'Ok.'
    read = {'filename': 'a.jpg', 'coll': 'Fish', 'token': token('a.jpg')}
    assert web.request('GET', '/fileget?' + urlencode(dict(read, type='O')))[2] == jpeg
    status, headers, thumb = web.request('GET', '/fileget?' + urlencode(dict(read, type='T', scale=123)))
    assert (status, image_info(thumb, tmp_path)) == (200, ('JPEG', 123, 82))
    assert web.request('GET', '/fileget?' + urlencode(dict(read, type='O', token='')))[0] == 403
    minted = int(read['token'].rpartition(':')[2]) - 1                      # for the delete, not the reads' own
    delete = dict(read, token=make_token(KEY, 'a.jpg', minted))
    status, _, body = web.request('POST', '/filedelete', urlencode(delete),
                                  {'Content-Type': 'application/x-www-form-urlencoded'})
    assert (status, body) == (200, b'Ok.')
    assert not (tmp_path / 'attachments' / 'fish' / 'originals' / 'a.jpg').exists()
    assert 'POST /fileupload 200' in web.output() and KEY not in web.output()


def test_a_server_started_without_a_key_makes_one_and_says_where(running, tmp_path):
    web = running(KEY=None)
    key_file = tmp_path / 'attachments' / '.web-asset-server.key'
    key = key_file.read_text().strip()
    assert str(key_file) in web.output() and key not in web.output()
    query = urlencode({'random': '1', 'token': make_token(key, '1')})
    assert web.request('GET', '/testkey?' + query)[0] == 200


def test_docker_environment_names_configure_the_server(running):
    web = running(KEY=None, ATTACHMENT_KEY='docker-key', SERVER_NAME='assets.museum.org',
                  SERVER_PORT='80', DEBUG_MODE='false')
    body = web.request('GET', '/web_asset_store.xml')[2]
    assert b'<url type="read">http://assets.museum.org/fileget</url>' in body
    query = urlencode({'random': '1', 'token': make_token('docker-key', '1')})
    assert web.request('GET', '/testkey?' + query)[0] == 200


def test_a_bad_setting_stops_the_start_with_a_clear_message(tmp_path):
    finished = subprocess.run([sys.executable, 'server.py'], cwd=PROJECT, capture_output=True, text=True,
                              env={'PATH': '/usr/bin:/bin', 'PORT': 'eighty', 'BASE_DIR': str(tmp_path)},
                              timeout=60)
    assert finished.returncode == 1
    assert 'cannot start' in finished.stderr and 'PORT' in finished.stderr
    assert 'Traceback' not in finished.stderr


def test_a_port_in_use_stops_the_start_with_one_clear_line_and_no_listening_claim(tmp_path):
    with socket.socket() as holder:
        holder.bind(('127.0.0.1', 0))
        holder.listen()
        port = holder.getsockname()[1]
        finished = subprocess.run([sys.executable, 'server.py'], cwd=PROJECT, capture_output=True, text=True,
                                  env={'PATH': '/usr/bin:/bin', 'HOST': '127.0.0.1', 'PORT': str(port),
                                       'BASE_DIR': str(tmp_path), 'KEY': KEY}, timeout=60)
    assert finished.returncode == 1
    assert f'cannot start: cannot listen on 127.0.0.1:{port}: Address already in use' in finished.stderr
    assert 'Traceback' not in finished.stderr and 'Listening on' not in finished.stderr


def test_a_client_that_disconnects_mid_upload_leaves_nothing(running, jpeg, tmp_path):
    web = running()
    content_type, body = multipart_body([('store', 'a.jpg'), ('type', 'O'), ('token', token('a.jpg')),
                                         ('file', 'a.jpg', jpeg * 50)])

    def files():
        return [p for p in (tmp_path / 'attachments').rglob('*') if p.is_file() and p.name != '.web-asset-server.key']
    with socket.create_connection(('127.0.0.1', web.port)) as raw:
        raw.sendall(f'POST /fileupload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n'
                    f'Content-Length: {len(body)}\r\n\r\n'.encode() + body[:len(body) // 2])
        assert wait_for(lambda: files() != [], 30)          # the server is receiving: half a file on disk
    assert wait_for(lambda: 'POST /fileupload ' in web.output(), 30)     # it has given up on the request
    assert files() == []
    assert web.request('GET', '/')[0] == 200


def test_silent_connections_are_dropped_so_they_cannot_hold_every_thread(running):
    web = running(THREADS='5', SOCKET_TIMEOUT='2')
    idle = [socket.create_connection(('127.0.0.1', web.port)) for _ in range(8)]
    try:
        for connection in idle:
            connection.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n')      # headers never finished
        started = time.monotonic()
        assert web.request('GET', '/', timeout=20)[0] == 200
        assert time.monotonic() - started < 15
    finally:
        for connection in idle:
            connection.close()


class AnswersAnything(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '0')
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_taken_before_the_server_binds_it_is_given_up_for_another(tmp_path, monkeypatch):
    impostor = ThreadingHTTPServer(('127.0.0.1', 0), AnswersAnything)     # takes the port first; answers 200
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    taken, free_port = iter([impostor.server_port]), harness.processes.free_port
    monkeypatch.setattr(harness.servers, 'free_port', lambda: next(taken, None) or free_port())
    try:
        web = RunningServer(tmp_path / 'attachments', tmp_path / 'server.log')
        try:
            assert web.port != impostor.server_port and holds_listener(web.process.pid, web.port)
            assert b'<urls>' in web.request('GET', '/web_asset_store.xml')[2]
        finally:
            web.stop()
    finally:
        impostor.shutdown()
        impostor.server_close()
