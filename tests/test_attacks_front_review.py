"""A review of the HTTP front as an attacker would probe it, against a real running server (`python
server.py` under Paste) over raw loopback sockets: connection accounting after resets, keep-alive after
HEAD and 304, Expect: 100-continue with real curl, chunked bodies, slow readers, stopping, odd heads."""

import http.client
import os
import re
import socket
import struct
import subprocess
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
    return socket.create_connection(('127.0.0.1', web.port), timeout=30, source_address=(source, 0))


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


def upload_request(name, data, extra=''):
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', server.make_token(KEY, name))])
    head = (f'POST /fileupload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}'
            f'Content-Length: {len(body)}\r\n\r\n').encode()
    return head, body


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
    held = [connect(web) for _ in range(2)]
    assert all(health(connection) == 200 for connection in held)
    for _ in range(server.REFUSALS_LINGERING - 10):       # fewer than are answered 503 at once
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
                           f'token={server.make_token(KEY, name)}', f'http://127.0.0.1:{web.port}/fileupload'],
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
