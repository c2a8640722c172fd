"""Small attacks on a real running server (`python server.py` under Paste), over raw loopback sockets:
what Paste answers on its own before the application sees a request."""

import socket
import time

import pytest

from conftest import RunningServer

pytestmark = pytest.mark.disk_only


@pytest.fixture(scope='module')
def web(tmp_path_factory):
    folder = tmp_path_factory.mktemp('attacks-small')
    running = RunningServer(folder / 'attachments', folder / 'server.log', ACCESS_LOG='false',
                            PREGENERATE_SCALE='none')
    yield running
    running.stop()


def raw_exchange(port, request, seconds=10):
    """(status, {header: value}, body) of the answer to these exact bytes; the server closes the connection."""
    with socket.create_connection(('127.0.0.1', port), timeout=seconds) as connection:
        connection.sendall(request)
        received = b''
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b'\r\n\r\n')
    status_line, *lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.split(': ', 1) for line in lines)
    return int(status_line.split()[1]), headers, body


MALFORMED = {
    'a request line of one word': (b'GARBAGE\r\n\r\n', 400),
    'a request line of four words': (b'GET / HTTP/1.1 more\r\n\r\n', 400),
    'an unreadable HTTP version': (b'GET / HTTP/x.y\r\n\r\n', 400),
    'a header line over 64 KiB': (b'GET / HTTP/1.1\r\nX-Long: ' + b'a' * 70_000 + b'\r\n\r\n', 431),
    'over 100 header lines': (b'GET / HTTP/1.1\r\n' + b''.join(b'X-%d: 1\r\n' % i for i in range(120)) + b'\r\n',
                              431),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_pastes_own_error_answers_carry_x_timestamp_and_cors_and_no_traceback(web, case):
    request, expected = MALFORMED[case]
    before = int(time.time())
    status, headers, body = raw_exchange(web.port, request)
    assert status == expected
    assert before <= int(headers['X-Timestamp']) <= time.time()
    assert headers['Access-Control-Allow-Origin'] == '*'
    assert headers['Content-Type'] == 'text/plain; charset=UTF-8'
    assert b'Traceback' not in body and b'<' not in body


def test_a_request_line_over_64_kib_is_414_with_x_timestamp(web):
    status, headers, body = raw_exchange(web.port, b'GET /' + b'a' * 70_000 + b' HTTP/1.1\r\n\r\n')
    assert (status, body) == (414, b'Request-URI Too Long.')
    assert 'X-Timestamp' in headers
