"""The HTTP front's counters and deadlines, spoken to over real loopback sockets: connections in total and per
client, requests in progress per client, a trusted proxy's clients, the waiting room's turn and wait, and the
head, body, lingering and answer deadlines. The server (the app behind front.FrontedPasteServer, as server.py
runs it) runs in this process, so that mutation testing reaches the front; test_hostile.py attacks a real
`python server.py` the same ways."""

import contextlib
import os
import socket
import threading
import time
import types

import pytest

import front
from waiting_room import WaitingRoom
import server
from config import load_config
from harness.client import KEY, multipart_body
from harness.processes import wait_for
from names import TEMP_PREFIX
from tokens import make_token

pytestmark = pytest.mark.serial          # timed against the machine: run alone, not beside another worker

ROOT_ANSWER = b'Web Asset Server for Specify: running.'


class Served:
    """The server on a loopback port: connections to it from any 127.0.0.x address."""

    def __init__(self, httpd, config):
        self.httpd, self.config, self.port = httpd, config, httpd.server_address[1]

    def connect(self, source='127.0.0.1'):
        sock = socket.socket()
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect(('127.0.0.1', self.port))
        return sock

    def get(self, path='/', source='127.0.0.1', headers=''):
        """(status line, headers, body) of one GET on a connection of its own."""
        with self.connect(source) as sock:
            sock.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n'.encode())
            return read_answer(sock)


@contextlib.contextmanager
def serving(tmp_path, waiting_room=None, **settings):
    """The app behind the front and Paste's threads on a free loopback port, stopped afterwards."""
    config = load_config({'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY, 'ACCESS_LOG': False,
                                 'PREGENERATE_SCALE': None, 'HOST': '127.0.0.1', **settings}, environ={})
    config.PORT = 0                     # any free port: the server says which
    httpd = front.FrontedPasteServer(server.create_app(config), config, waiting_room)
    accepting = threading.Thread(target=httpd.serve_forever, daemon=True)
    accepting.start()
    try:
        yield Served(httpd, config)
    finally:
        httpd.running = False
        with contextlib.suppress(OSError):
            socket.create_connection(('127.0.0.1', httpd.server_address[1]), timeout=5).close()   # wakes accept()
        accepting.join(10)
        httpd.socket.close()


def read_answer(sock):
    """(status line, headers as a dict of lower-case names, body) of one answer (by Content-Length, else to the
    end); b'' as the status line when the connection ends first (closed, or reset under load)."""
    data = b''
    while b'\r\n\r\n' not in data:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            more = b''
        if not more:
            return b'', {}, data
        data += more
    head, rest = data.split(b'\r\n\r\n', 1)
    lines, body = head.split(b'\r\n'), bytearray(rest)
    headers = {name.strip().lower().decode(): value.strip().decode()
               for name, _, value in (line.partition(b':') for line in lines[1:])}
    length = int(headers['content-length']) if 'content-length' in headers else None
    while length is None or len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return lines[0], headers, bytes(body)


def status(answer):
    """The answer's status code; 0 when the connection ended without one."""
    return int(answer[0].split()[1]) if answer[0] else 0


def ended(sock):
    """True when the server closed the connection without a further answer (whatever it sent is read)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            if data.startswith(b'HTTP/'):
                return False
    except ConnectionResetError:
        return True


def upload_parts(name, data=b'x' * 1000):
    """(head, body) of an upload of `data` as `name`, ready to be sent in pieces."""
    content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'),
                                         ('token', make_token(KEY, name))])
    head = (f'POST /fileupload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n'
            f'Content-Length: {len(body)}\r\n\r\n').encode()
    return head, body


class HeldUpload:
    """An upload whose body has arrived but for its last bytes: a request in progress, holding a thread that
    reads its body, until finish() sends them (or the block ends)."""

    def __init__(self, web, name='held.bin', source='127.0.0.1'):
        head, body = upload_parts(name)
        self.sock, self.rest = web.connect(source), body[-10:]
        self.sock.sendall(head + body[:-10])

    def finish(self):
        """Send the last bytes; the upload's answer."""
        self.sock.sendall(self.rest)
        return read_answer(self.sock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


def kept_alive(web, source='127.0.0.1', headers=''):
    """A connection that has had one answer (so it is counted) and stays open, idle, for the next request."""
    sock = web.connect(source)
    sock.sendall(f'GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n'.encode())
    assert read_answer(sock)[2] == ROOT_ANSWER
    return sock


def receiving(web, uploads=1):
    """True once `uploads` uploads are being received (each has its temporary file in the staging folder)."""
    return wait_for(lambda: len([name for name in os.listdir(web.config.BASE_DIR)
                                 if name.startswith(TEMP_PREFIX)]) >= uploads)


# --- Connections in total ---------------------------------------------------------------------------------

def test_a_connection_beyond_max_connections_is_answered_503_with_retry_after_5(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS=2) as web, kept_alive(web), kept_alive(web):
        answer = web.get()
        assert (status(answer), answer[1]['retry-after']) == (503, '5')


def test_connections_already_open_are_served_while_others_are_refused_over_max_connections(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS=2) as web, kept_alive(web) as first, kept_alive(web):
        assert status(web.get()) == 503
        first.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_answer(first)[2] == ROOT_ANSWER


def test_closed_connections_give_their_places_back_one_for_one(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS=2) as web:
        for sock in [kept_alive(web), kept_alive(web)]:
            sock.close()
        assert wait_for(lambda: status(web.get()) == 200)
        with kept_alive(web), kept_alive(web):
            assert status(web.get()) == 503


def test_a_connection_refused_over_max_connections_does_not_take_a_place(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS=1) as web:
        with kept_alive(web):
            assert status(web.get()) == 503
        assert wait_for(lambda: status(web.get()) == 200)


# --- Connections per client -------------------------------------------------------------------------------

def test_a_connection_beyond_max_connections_per_client_is_answered_503_with_retry_after_5(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS_PER_CLIENT=2) as web, \
            kept_alive(web), kept_alive(web):
        answer = web.get()
        assert (status(answer), answer[1]['retry-after']) == (503, '5')


def test_another_client_is_served_while_one_is_at_its_connection_cap(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS_PER_CLIENT=1) as web, kept_alive(web):
        assert status(web.get(source='127.0.0.2')) == 200


def test_a_client_whose_connection_closed_may_open_another(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS_PER_CLIENT=1) as web:
        kept_alive(web).close()
        assert wait_for(lambda: status(web.get()) == 200)


# --- Requests in progress per client ----------------------------------------------------------------------

def test_a_request_beyond_max_requests_per_client_is_answered_503_with_retry_after_1(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web, HeldUpload(web):
        assert receiving(web)
        answer = web.get()
        assert (status(answer), answer[1]['retry-after']) == (503, '1')


def test_another_client_is_served_while_one_is_at_its_request_cap(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web, HeldUpload(web):
        assert receiving(web)
        assert status(web.get(source='127.0.0.2')) == 200


def test_a_finished_request_no_longer_counts_against_its_client(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web:
        with HeldUpload(web) as upload:
            assert receiving(web)
            assert upload.finish()[2] == b'Ok.'
        assert wait_for(lambda: status(web.get()) == 200)       # counted out once its answer is sent


def test_requests_on_one_kept_alive_connection_count_one_at_a_time(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web, kept_alive(web) as sock:
        for _ in range(3):
            sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            assert read_answer(sock)[2] == ROOT_ANSWER


def test_a_request_refused_over_the_request_cap_does_not_count_against_its_client(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web:
        with HeldUpload(web) as upload:
            assert receiving(web)
            assert [status(web.get()) for _ in range(3)] == [503] * 3
            upload.finish()
        assert wait_for(lambda: status(web.get()) == 200)       # counted out once its answer is sent


# --- Behind a trusted proxy -------------------------------------------------------------------------------

def forwarded_for(client):
    return f'X-Forwarded-For: {client}\r\n'


def test_behind_a_trusted_proxy_the_connection_cap_counts_each_named_client(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1) as web, kept_alive(web, headers=forwarded_for('192.0.2.1')):
        assert status(web.get(headers=forwarded_for('192.0.2.2'))) == 200
        answer = web.get(headers=forwarded_for('192.0.2.1'))
        assert (status(answer), answer[1]['retry-after']) == (503, '5')


def test_behind_a_trusted_proxy_the_request_cap_counts_each_named_client(tmp_path):
    with serving(tmp_path, MAX_REQUESTS_PER_CLIENT=1) as web:
        head, body = upload_parts('held.bin')
        with web.connect() as sock:
            sock.sendall(head.replace(b'Host: x\r\n', b'Host: x\r\n' + forwarded_for('192.0.2.1').encode())
                         + body[:-10])
            assert receiving(web)
            assert status(web.get(headers=forwarded_for('192.0.2.2'))) == 200
            assert status(web.get(headers=forwarded_for('192.0.2.1'))) == 503
            assert status(web.get()) == 200              # the proxy's own requests are its own


def test_a_connection_from_an_untrusted_peer_counts_against_the_peer_whatever_it_names(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=['127.0.0.2'], MAX_CONNECTIONS_PER_CLIENT=1) as web, \
            kept_alive(web, headers=forwarded_for('192.0.2.1')):
        assert status(web.get(headers=forwarded_for('192.0.2.2'))) == 503


def test_a_trusted_proxys_connection_beyond_the_cap_must_begin_its_request_within_proxy_head_seconds(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1) as web, web.connect() as idle, web.connect() as hurried:
        started = time.monotonic()
        hurried.settimeout(front.PROXY_HEAD_SECONDS + 5)
        assert ended(hurried)
        assert front.PROXY_HEAD_SECONDS - 0.5 <= time.monotonic() - started < front.PROXY_HEAD_SECONDS + 3
        idle.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_answer(idle)[2] == ROOT_ANSWER


def test_a_hurried_connection_that_begins_its_request_in_time_has_the_whole_request_head_timeout(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1, REQUEST_HEAD_TIMEOUT=4) as web, web.connect(), \
            web.connect() as hurried:
        started = time.monotonic()
        hurried.sendall(b'GET / HTTP/1.1\r\n')
        assert status(read_answer(hurried)) == 408
        assert 3.5 <= time.monotonic() - started < 7


# --- Deadlines: the request head and body -------------------------------------------------------------------

def test_a_request_head_not_whole_within_request_head_timeout_is_answered_408(tmp_path):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=1) as web, web.connect() as sock:
        started = time.monotonic()
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n')
        assert status(read_answer(sock)) == 408
        assert 0.9 <= time.monotonic() - started < 4


def test_trickling_a_head_does_not_extend_request_head_timeout(tmp_path):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=2) as web, web.connect() as sock:
        started = time.monotonic()
        answer = []
        reader = threading.Thread(target=lambda: answer.append(read_answer(sock)))
        reader.start()
        with contextlib.suppress(OSError):
            while reader.is_alive() and time.monotonic() - started < 6:
                sock.sendall(b'X')
                time.sleep(0.2)
        reader.join(10)
        assert status(answer[0]) == 408
        assert 1.9 <= time.monotonic() - started < 5


def test_a_connection_that_sends_nothing_is_closed_after_request_head_timeout_without_an_answer(tmp_path):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=1) as web, web.connect() as sock:
        started = time.monotonic()
        assert ended(sock)
        assert 0.9 <= time.monotonic() - started < 4


def test_a_kept_alive_connection_is_closed_request_head_timeout_after_its_last_answer(tmp_path):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=2) as web, kept_alive(web) as sock:
        time.sleep(1)
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')    # a second request restarts the clock
        assert read_answer(sock)[2] == ROOT_ANSWER
        answered = time.monotonic()
        assert ended(sock)
        assert 1.9 <= time.monotonic() - answered < 5


def test_an_upload_slower_than_request_body_min_rate_after_the_grace_is_answered_408(tmp_path):
    with serving(tmp_path, REQUEST_BODY_GRACE=1, REQUEST_BODY_MIN_RATE=10_000_000) as web, HeldUpload(web) as upload:
        started = time.monotonic()
        answer = read_answer(upload.sock)
        assert (status(answer), answer[2]) == (408, b'The upload arrived too slowly.')
        assert time.monotonic() - started < 4


def test_an_upload_arriving_within_the_grace_is_stored(tmp_path):
    with serving(tmp_path, REQUEST_BODY_GRACE=3, REQUEST_BODY_MIN_RATE=10_000_000) as web, HeldUpload(web) as upload:
        time.sleep(1)
        assert upload.finish()[2] == b'Ok.'


def test_an_upload_keeping_request_body_min_rate_after_the_grace_is_stored(tmp_path):
    head, body = upload_parts('steady.bin', b'x' * 80_000)
    with serving(tmp_path, REQUEST_BODY_GRACE=1, REQUEST_BODY_MIN_RATE=20_000) as web, web.connect() as sock:
        sock.sendall(head)
        started = time.monotonic()
        for at in range(0, len(body), 4000):     # 40 kB/s: twice the rate, for two seconds
            time.sleep(max(0.0, started + at / 40_000 - time.monotonic()))
            sock.sendall(body[at:at + 4000])
        assert read_answer(sock)[2] == b'Ok.'


# --- The waiting room -------------------------------------------------------------------------------------

def one_body_at_a_time(wait):
    """A waiting room, as server.py builds it, with one thread for request bodies (and one for conversions)."""
    return WaitingRoom(server.waits_its_turn, {'conversion': 1, 'body': 1}, wait, total=1)


def test_an_upload_waits_without_an_answer_while_the_thread_for_bodies_is_taken_then_is_stored(tmp_path):
    with serving(tmp_path, one_body_at_a_time(wait=30)) as web, HeldUpload(web) as first:
        assert receiving(web)
        head, body = upload_parts('second.bin')
        with web.connect('127.0.0.2') as second:
            second.sendall(head + body)
            second.settimeout(1)
            with pytest.raises(TimeoutError):
                second.recv(1)                      # waiting its turn, holding no thread
            assert first.finish()[2] == b'Ok.'
            second.settimeout(30)
            assert read_answer(second)[2] == b'Ok.'


def test_a_request_that_waited_its_wait_in_vain_is_answered_503_with_retry_after_5(tmp_path):
    with serving(tmp_path, one_body_at_a_time(wait=1)) as web, HeldUpload(web):
        assert receiving(web)
        head, body = upload_parts('second.bin')
        with web.connect('127.0.0.2') as second:
            started = time.monotonic()
            second.sendall(head + body)
            answer = read_answer(second)
            assert (status(answer), answer[1]['retry-after']) == (503, '5')
            assert 0.9 <= time.monotonic() - started < 4


def test_a_request_refused_after_waiting_no_longer_counts_against_its_client(tmp_path):
    with serving(tmp_path, one_body_at_a_time(wait=1), TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web, \
            HeldUpload(web):
        assert receiving(web)
        head, body = upload_parts('second.bin')
        with web.connect('127.0.0.2') as second:
            second.sendall(head + body)
            assert status(read_answer(second)) == 503
        assert status(web.get(source='127.0.0.2')) == 200


def test_requests_that_need_no_turn_are_served_while_others_wait(tmp_path):
    with serving(tmp_path, one_body_at_a_time(wait=30)) as web, HeldUpload(web):
        assert receiving(web)
        assert status(web.get()) == 200



# --- Deadlines: lingering after an early answer, and the answer -------------------------------------------

def closed_after(sock, every=0.1, keep_sending=True, limit=10):
    """Seconds until the server has closed the connection, told by a send failing (the first send after the close
    is still taken; the peer's reset fails the next): sending every `every` seconds, or, without `keep_sending`,
    only probing (two sends close together, so that the server sees no steady stream)."""
    started = time.monotonic()
    with contextlib.suppress(OSError):
        while time.monotonic() - started < limit:
            sock.sendall(b'x')
            if not keep_sending:
                time.sleep(0.05)
                sock.sendall(b'x')
            time.sleep(every)
        return None
    return time.monotonic() - started


@pytest.fixture
def short_lingering(monkeypatch):
    """Lingering shortened to 3 seconds at most, closed once the client is quiet for 1."""
    monkeypatch.setattr(front, 'LINGER_SECONDS', 3)
    monkeypatch.setattr(front, 'LINGER_QUIET_SECONDS', 1)


def early_answer(web):
    """A connection answered 413 before its body was read (the upload is over MAX_UPLOAD_SIZE)."""
    head, _body = upload_parts('large.bin', b'x' * 100_000)
    sock = web.connect()
    sock.sendall(head)
    assert status(read_answer(sock)) == 413
    return sock


def test_after_an_early_answer_what_the_client_still_sends_is_read_until_linger_seconds(tmp_path, short_lingering):
    with serving(tmp_path, MAX_UPLOAD_SIZE=1000) as web, early_answer(web) as sock:
        assert 2.8 <= closed_after(sock) < 5


def test_after_an_early_answer_the_connection_closes_once_the_client_is_quiet_for_linger_quiet_seconds(
        tmp_path, short_lingering):
    with serving(tmp_path, MAX_UPLOAD_SIZE=1000) as web, early_answer(web) as sock:
        assert 0.9 <= closed_after(sock, every=1.3, keep_sending=False) < 2.5


def test_a_connection_refused_over_the_caps_lingers_only_linger_quiet_seconds_however_much_is_sent(
        tmp_path, short_lingering):
    with serving(tmp_path, MAX_CONNECTIONS=1) as web, kept_alive(web), web.connect() as refused:
        assert status(read_answer(refused)) == 503
        assert 0.8 <= closed_after(refused) < 2.5


def test_a_lingering_connection_no_longer_counts_once_closed(tmp_path, short_lingering):
    with serving(tmp_path, MAX_UPLOAD_SIZE=1000, MAX_CONNECTIONS=1) as web:
        with early_answer(web):
            time.sleep(1.5)                                 # quiet for LINGER_QUIET_SECONDS: closed
        assert wait_for(lambda: status(web.get()) == 200)


def store(web, name, data):
    folder = os.path.join(web.config.BASE_DIR, 'originals')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), 'wb') as f:
        f.write(data)


def asking(web, path):
    """A connection with a small receive buffer that has asked for `path` and reads nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(('127.0.0.1', web.port))
    sock.sendall(f'GET {path} HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
    return sock


def read_all(sock):
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while more := sock.recv(1 << 20):
            data += more
    return data


LARGE = 16 * 2**20


def test_an_answer_read_slower_than_answer_min_rate_after_the_grace_is_cut_off(tmp_path):
    with serving(tmp_path, ANSWER_GRACE=1, ANSWER_MIN_RATE=100_000_000) as web:
        store(web, 'large.bin', os.urandom(LARGE))
        with asking(web, '/fileget?filename=large.bin&type=O') as sock:
            time.sleep(2.5)
            assert len(read_all(sock)) < LARGE


def test_an_answer_read_at_once_is_sent_whole(tmp_path):
    with serving(tmp_path, ANSWER_GRACE=1, ANSWER_MIN_RATE=100_000) as web:
        store(web, 'large.bin', os.urandom(LARGE))
        with asking(web, '/fileget?filename=large.bin&type=O') as sock:
            assert len(read_answer(sock)[2]) == LARGE


def test_an_answer_cut_off_no_longer_counts_against_its_client_or_the_total(tmp_path):
    with serving(tmp_path, ANSWER_GRACE=1, ANSWER_MIN_RATE=100_000_000, MAX_CONNECTIONS=1,
                 TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web:
        store(web, 'large.bin', os.urandom(LARGE))
        with asking(web, '/fileget?filename=large.bin&type=O'):
            assert wait_for(lambda: status(web.get()) == 200)


def test_a_request_that_waited_in_vain_is_logged_naming_its_client_and_the_wait(tmp_path, caplog):
    with serving(tmp_path, one_body_at_a_time(wait=1)) as web, HeldUpload(web):
        assert receiving(web)
        head, body = upload_parts('second.bin')
        with web.connect('127.0.0.2') as second:
            second.sendall(head + body)
            assert status(read_answer(second)) == 503
    assert 'A request of 127.0.0.2 waited 1s for a thread in vain; refused with 503' in caplog.messages


# The waiting room's turns, request by request (the connections stand for requests of a client and a kind).

def request(client, kind='body'):
    return types.SimpleNamespace(client=client, kind=kind)


def test_a_client_whose_requests_have_all_ended_no_longer_counts_in_the_fair_share():
    room = WaitingRoom(lambda head: 'body', {'body': 6}, wait=60, total=3)
    assert [room.enter(request(client)) for client in ('b', 'b', 'z')] == [True, True, True]
    third, other = request('b'), request('d')
    assert [room.enter(third), room.enter(other)] == [False, False]
    assert room.leave('z', 'body') == [third]       # two clients present: a fair share is 3, b has 2


def test_a_clients_requests_still_running_count_after_one_of_them_ends():
    room = WaitingRoom(lambda head: 'body', {'body': 4}, wait=60)
    assert [room.enter(request('b')) for _ in range(2)] == [True, True]
    room.leave('b', 'body')
    assert [room.enter(request('b')) for _ in range(2)] == [True, False]      # at most half of 4


def test_a_request_let_in_from_the_line_counts_under_its_kind():
    room = WaitingRoom(lambda head: 'body', {'conversion': 2, 'body': 2}, wait=60, total=2)
    assert [room.enter(request('u')), room.enter(request('v'))] == [True, True]
    waiting, later = request('w'), request('x')
    assert room.enter(waiting) is False
    assert room.leave('u', 'body') == [waiting]
    assert room.enter(later) is False
    assert room.leave('w', 'body') == [later]


def test_a_thread_nobody_below_a_fair_share_waits_for_goes_to_a_client_below_half():
    room = WaitingRoom(lambda head: 'body', {'body': 6}, wait=60, total=5)
    assert [room.enter(request(client)) for client in ('b', 'b', 'c', 'c', 'd')] == [True] * 5
    third = request('b')
    assert room.enter(third) is False
    assert room.leave('c', 'body') == [third]       # three clients: a fair share is 2, b has 2 but half is 3


# --- Lingering after the front's own answers ----------------------------------------------------------------

def test_after_a_408_for_a_late_head_the_connection_closes_once_the_client_is_quiet(tmp_path, short_lingering):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=1) as web, web.connect() as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n')
        assert status(read_answer(sock)) == 408
        assert 0.9 <= closed_after(sock, every=1.3, keep_sending=False) < 2.5


def test_an_upload_slowing_below_request_body_min_rate_after_the_grace_is_answered_408(tmp_path):
    head, body = upload_parts('slowing.bin', b'x' * 20_000)
    with serving(tmp_path, REQUEST_BODY_GRACE=1, REQUEST_BODY_MIN_RATE=10_000) as web, web.connect() as sock:
        sock.sendall(head)
        started, answer = time.monotonic(), []
        reader = threading.Thread(target=lambda: answer.append(read_answer(sock)))
        reader.start()
        with contextlib.suppress(OSError):
            for at in range(0, len(body), 1000):      # 4 kB/s: the body would take 5 s, the rate allows 2
                if not reader.is_alive():
                    break
                sock.sendall(body[at:at + 1000])
                time.sleep(0.25)
        reader.join(10)
        assert (status(answer[0]), answer[0][2]) == (408, b'The upload arrived too slowly.')
        assert time.monotonic() - started < 4


# --- Refusals that linger, and those beyond -----------------------------------------------------------------

@pytest.fixture
def three_refusals_linger(monkeypatch):
    """At most 3 refused connections linger at once (REFUSALS_LINGERING), so that a test can go beyond."""
    monkeypatch.setattr(front, 'REFUSALS_LINGERING', 3)


def over_a_cap(web, count, source='127.0.0.1'):
    """`count` connections opened one after another over a cap, each kept open: (their sockets, what each was
    answered: 503, or 0 when it was closed without an answer)."""
    socks, answered = [], []
    for _ in range(count):
        socks.append(web.connect(source))
        answered.append(status(read_answer(socks[-1])))
    return socks, answered


def round_of_refusals(web, source='127.0.0.1'):
    """What four connections over a cap opened together were answered; all closed afterwards."""
    socks, answered = over_a_cap(web, 4, source)
    for sock in socks:
        sock.close()
    return answered


@pytest.mark.parametrize('cap', ['MAX_CONNECTIONS', 'MAX_CONNECTIONS_PER_CLIENT'])
def test_beyond_the_refusals_lingering_a_connection_over_a_cap_is_closed_without_an_answer(
        tmp_path, three_refusals_linger, cap):
    with serving(tmp_path, TRUSTED_PROXIES=None, **{cap: 1}) as web, kept_alive(web):
        assert round_of_refusals(web) == [503, 503, 503, 0]


@pytest.mark.parametrize('cap', ['MAX_CONNECTIONS', 'MAX_CONNECTIONS_PER_CLIENT'])
def test_refusals_that_ended_no_longer_count_as_lingering(tmp_path, three_refusals_linger, cap):
    with serving(tmp_path, TRUSTED_PROXIES=None, **{cap: 1}) as web, kept_alive(web):
        round_of_refusals(web)
        assert wait_for(lambda: round_of_refusals(web) == [503, 503, 503, 0])


def test_a_connection_closed_without_an_answer_over_max_connections_frees_no_place(tmp_path, three_refusals_linger):
    with serving(tmp_path, MAX_CONNECTIONS=1) as web, kept_alive(web) as held:
        round_of_refusals(web)
        assert wait_for(lambda: status(web.get()) == 503)
        held.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_answer(held)[2] == ROOT_ANSWER


def test_connections_closed_without_an_answer_over_a_clients_cap_free_no_place_in_the_total(
        tmp_path, three_refusals_linger):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS=2, MAX_CONNECTIONS_PER_CLIENT=1) as web, \
            kept_alive(web):
        assert round_of_refusals(web) == [503, 503, 503, 0]
        with kept_alive(web, '127.0.0.2'):
            assert wait_for(lambda: status(web.get(source='127.0.0.3')) == 503)


def test_a_connection_refused_over_a_clients_cap_takes_no_place_in_the_total(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS=3, MAX_CONNECTIONS_PER_CLIENT=1) as web, \
            kept_alive(web):
        assert status(web.get()) == 503
        with kept_alive(web, '127.0.0.2'):
            assert status(web.get(source='127.0.0.3')) == 200


def test_a_connection_over_a_clients_cap_is_answered_503_before_it_sends_anything(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS_PER_CLIENT=1) as web, kept_alive(web), \
            web.connect() as beyond:
        assert status(read_answer(beyond)) == 503


def test_a_refused_connections_end_does_not_count_out_its_clients_open_one(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_CONNECTIONS_PER_CLIENT=1) as web, kept_alive(web):
        with web.connect() as refused:
            assert status(read_answer(refused)) == 503
        time.sleep(0.5)                                  # the refused one's end is read and it is counted out
        assert status(web.get()) == 503


def test_a_request_cap_of_two_lets_two_requests_of_a_client_run(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=2) as web, HeldUpload(web), \
            HeldUpload(web, 'other.bin'):
        assert receiving(web, 2)
        assert status(web.get()) == 503


def test_a_client_refused_over_its_request_cap_is_logged_naming_the_cap(tmp_path, caplog):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=1) as web, HeldUpload(web):
        assert receiving(web)
        assert status(web.get()) == 503
    assert '127.0.0.1 is at its cap of requests; requests beyond it are refused with 503' in caplog.messages


def test_a_client_a_proxy_names_refused_over_its_connection_cap_is_logged_naming_the_cap(tmp_path, caplog):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1) as web, kept_alive(web, headers=forwarded_for('192.0.2.1')):
        assert status(web.get(headers=forwarded_for('192.0.2.1'))) == 503
    assert '192.0.2.1 is at its cap of connections; requests beyond it are refused with 503' in caplog.messages


def test_an_empty_line_before_the_next_request_on_a_kept_alive_connection_is_dropped(tmp_path):
    with serving(tmp_path) as web, kept_alive(web) as sock:
        sock.sendall(b'\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n')
        assert read_answer(sock)[2] == ROOT_ANSWER


# --- A trusted proxy's connections, counted against the clients it names -----------------------------------

def test_a_proxys_connection_that_named_a_client_no_longer_counts_against_the_proxy(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1, REQUEST_HEAD_TIMEOUT=4) as web, \
            kept_alive(web, headers=forwarded_for('192.0.2.1')), web.connect() as next_one:
        started = time.monotonic()
        assert ended(next_one)
        assert 3.5 <= time.monotonic() - started < 7         # not hurried: the whole REQUEST_HEAD_TIMEOUT


def test_a_proxys_idle_connection_still_counts_after_another_moved_to_the_client_it_named(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1, REQUEST_HEAD_TIMEOUT=4) as web, web.connect(), \
            kept_alive(web, headers=forwarded_for('192.0.2.1')), web.connect() as hurried:
        started = time.monotonic()
        assert ended(hurried)
        assert time.monotonic() - started < front.PROXY_HEAD_SECONDS + 1.5


def test_a_named_clients_connection_that_closed_no_longer_counts_against_it(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1) as web:
        kept_alive(web, headers=forwarded_for('192.0.2.1')).close()
        assert wait_for(lambda: status(web.get(headers=forwarded_for('192.0.2.1'))) == 200)


def test_after_a_request_ends_its_client_has_exactly_its_request_cap_again(tmp_path):
    with serving(tmp_path, TRUSTED_PROXIES=None, MAX_REQUESTS_PER_CLIENT=2) as web, HeldUpload(web) as first, \
            HeldUpload(web, 'second.bin'):
        assert receiving(web, 2)
        assert first.finish()[2] == b'Ok.'
        assert wait_for(lambda: status(web.get()) == 200)       # the first counted out (a GET takes its place)
        with HeldUpload(web, 'third.bin'):
            assert receiving(web, 2)
            assert status(web.get()) == 503


def test_a_deadline_sooner_than_a_second_away_is_acted_on_at_its_time(tmp_path):
    with serving(tmp_path, REQUEST_HEAD_TIMEOUT=2) as web, web.connect() as first:
        first.sendall(b'GET / HTTP/1.1\r\n')
        time.sleep(0.3)
        with web.connect() as second:
            started = time.monotonic()
            second.sendall(b'GET / HTTP/1.1\r\n')
            assert status(read_answer(first)) == 408
            assert status(read_answer(second)) == 408
            assert 1.9 <= time.monotonic() - started < 2.5      # 0.3 s after the first's, not a second after


def test_a_hurried_connection_trickling_its_head_is_answered_408_at_request_head_timeout(tmp_path):
    with serving(tmp_path, MAX_CONNECTIONS_PER_CLIENT=1, REQUEST_HEAD_TIMEOUT=3) as web, web.connect(), \
            web.connect() as hurried:
        started, answer = time.monotonic(), []
        reader = threading.Thread(target=lambda: answer.append(read_answer(hurried)))
        reader.start()
        with contextlib.suppress(OSError):
            while reader.is_alive() and time.monotonic() - started < 8:
                hurried.sendall(b'X')
                time.sleep(0.3)
        reader.join(10)
        assert status(answer[0]) == 408
        assert 2.9 <= time.monotonic() - started < 5
