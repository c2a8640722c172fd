"""Slow and greedy clients against a real running server (`python server.py` under Paste), over raw
loopback sockets: request heads read without threads, read deadlines, connection caps, lingering close."""

import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time

import pytest

import server
from conftest import KEY, RunningServer, multipart_body, wait_for

pytestmark = pytest.mark.disk_only


@pytest.fixture
def start(tmp_path):
    """start(**settings) runs a server for this test; all are stopped after it."""
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


def upload_request(name, data):
    """The head and body of a Specify upload of `data` as `name`."""
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', server.make_token(KEY, name))])
    head = (f'POST /fileupload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n'
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
    return [path for path in web.base_dir.rglob(server.TEMP_PREFIX + '*') if path.is_file()]


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
    with connect(web) as connection:
        started = time.monotonic()
        in_background(send_paced, connection, b'GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ' + b'a' * 1000, 5, stop)
        status, headers, body = answer_of(connection)
        stop.set()
    assert (status, body) == (408, b'Request Timeout.')
    assert 'X-Timestamp' in headers
    assert 2 <= time.monotonic() - started < 6


def test_a_connection_that_sends_nothing_is_closed_without_an_answer_after_request_head_timeout(start):
    web = start(REQUEST_HEAD_TIMEOUT='2')
    with connect(web) as connection:
        started = time.monotonic()
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
    head, body = upload_request('modem.jpg', data)
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

def test_connections_beyond_max_connections_per_client_are_answered_503_with_retry_after(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='3')
    held = [connect(web) for _ in range(3)]
    try:
        with connect(web) as extra:
            status, headers, body = get(extra)
        assert (status, headers['Retry-After'], body) == (503, '5', b'Service Unavailable.')
        with connect(web, source='127.0.0.2') as other:
            assert get(other)[0] == 200
    finally:
        for connection in held:
            connection.close()


def test_a_client_under_its_connection_cap_again_is_served(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='3')
    held = [connect(web) for _ in range(3)]
    held.pop().close()
    try:
        assert wait_for(lambda: get(connect(web))[0] == 200, 10)
    finally:
        for connection in held:
            connection.close()


def test_a_flood_of_connections_from_one_address_keeps_the_servers_descriptors_bounded(start):
    web = start(MAX_CONNECTIONS_PER_CLIENT='2')
    baseline = len(os.listdir(f'/proc/{web.process.pid}/fd'))
    flood = []
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                flood.append(connect(web))
        bound = baseline + 2 + server.REFUSALS_LINGERING + 4          # well before refusals stop lingering
        assert wait_for(lambda: len(os.listdir(f'/proc/{web.process.pid}/fd')) <= bound, server.LINGER_QUIET_SECONDS - 2)
        with connect(web, source='127.0.0.2') as other:
            assert get(other)[0] == 200
    finally:
        for connection in flood:
            connection.close()


def test_connections_beyond_max_connections_are_answered_503_whoever_opens_them(start):
    web = start(MAX_CONNECTIONS='4', MAX_CONNECTIONS_PER_CLIENT='50')
    held = [connect(web, source=f'127.0.0.{2 + i}') for i in range(4)]
    try:
        with connect(web, source='127.0.0.9') as extra:
            assert get(extra)[0] == 503
    finally:
        for connection in held:
            connection.close()
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


def test_behind_a_trusted_proxy_requests_are_counted_per_forwarded_client_and_logged_under_it(start):
    web = start(MAX_REQUESTS_PER_CLIENT='1', TRUST_PROXY_HEADERS='true')
    stop, held = hold_requests(web, 1, forwarded_for='203.0.113.7, 198.51.100.1')
    try:
        assert wait_for(lambda: len(staged(web)) == 1, 10)
        for forwarded, expected in (('198.51.100.1', 503), ('198.51.100.2', 200)):
            with connect(web) as connection:
                connection.sendall(f'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                   f'X-Forwarded-For: {forwarded}\r\n\r\n'.encode())
                assert answer_of(connection)[0] == expected
        assert wait_for(lambda: '198.51.100.2 GET /health 200' in web.output(), 10)
    finally:
        release(stop, held)


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
    assert time.monotonic() - started < server.LINGER_QUIET_SECONDS + 3
