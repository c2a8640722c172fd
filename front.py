"""The HTTP front of the Web Asset Server: what stands between the network and Paste's threads.

Paste gives each connection a worker thread of its own, so a client trickling its request head, or
keeping idle connections open, could hold every thread. Here Paste still accepts and its threads still
run requests, but one selector thread reads every request's line and headers first, caps connections
per client and in total and requests in progress per client, and lingers on close; only whole
request heads reach a thread (as nginx and Apache's event MPM do). Behind a trusted proxy (TRUSTED_PROXIES)
the client is the address the proxy names, so one nginx in front of a whole institution is not one client.
Requests that wait for conversions hold at most a bounded number of threads; the rest wait here, without a
thread, in turn client by client (WaitingRoom). See docs/security.md.

Imports run one way: this module imports only the shared pieces (files, names); server.py builds on it and
hands it the waiting room (waiting_room.py).
"""

import collections
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import posixpath
import re
import selectors
import socket
import sys
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from paste import httpserver

from files import CHUNK
from names import printable

MAX_REQUEST_LINE = 64 * 1024     # Longest request line read (as http.server reads); Paste alone has no bound.
MAX_REQUEST_HEAD = 128 * 1024    # Longest request line and headers together; more is 431.
LINGER_SECONDS = 30              # After a connection's last answer, what the client still sends is read and dropped
LINGER_QUIET_SECONDS = 5         # for up to this long (until it is quiet this long or has sent LINGER_MAX_BYTES),
LINGER_MAX_BYTES = 1024 ** 3     # so that it reads an early answer (413) instead of a TCP reset, as nginx does.
REFUSALS_LINGERING = 64          # Connections refused over the caps that linger at once; beyond, they are just closed.
PROXY_HEAD_SECONDS = 2           # A trusted proxy's connection beyond MAX_CONNECTIONS_PER_CLIENT not yet carrying a
                                 # request must begin its head this soon (a proxy sends it at once), else it is closed.

log = logging.getLogger('web_asset_server')

HEAD_END = re.compile(rb'\r?\n\r?\n')
BARE_CR = re.compile(rb'\r(?!\n)')
FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?")     # RFC 9110 token, colon, value
FORWARDED_FOR = re.compile(rb'^x-forwarded-for:[ \t]*([^\r\n]*)', re.I | re.M)
REAL_IP = re.compile(rb'^x-real-ip:[ \t]*([^\r\n]*)', re.I | re.M)
LONGEST_CLIENT = 64              # characters of a client address a proxy names that are kept
WARN_EVERY = 10                  # Seconds between two warnings of a client's refusals (a flood must not flood the log).


def plain_answer(code, with_body=True, extra=()):
    """A whole closing answer that names its status only, stamped like the app's answers."""
    phrase = HTTPStatus(code).phrase
    body = f'{phrase}.'.encode()
    headers = [('Date', formatdate(usegmt=True)), ('Content-Type', 'text/plain; charset=UTF-8'),
               ('Content-Length', str(len(body))), ('Connection', 'close'), ('X-Timestamp', str(int(time.time()))),
               ('Access-Control-Allow-Origin', '*'), *extra]
    head = f'HTTP/1.1 {code} {phrase}\r\n' + ''.join(f'{name}: {value}\r\n' for name, value in headers) + '\r\n'
    return head.encode('latin-1') + (body if with_body else b'')


class Connection:
    """One client connection as the front holds it between requests."""

    def __init__(self, sock, peer):
        self.sock, self.peer, self.client = sock, peer[0], peer[0]
        self.counted = peer[0]         # the client this connection counts against: its peer, or the client a
                                       # trusted proxy last named on it
        self.waited = False            # whether its request went through the waiting room
        self.kind = None               # what it waited for there ('conversion', 'body')
        self.waits_until = 0.0         # when its request, waiting for a thread there, is answered 503
        self.hurried = False           # a trusted peer's beyond the cap: its head is due in PROXY_HEAD_SECONDS
        self.pending = bytearray()     # bytes read from the client and not yet given to a request
        self.scanned = 0               # how far `pending` is known to hold no end of a head
        self.line_ended = False        # whether `pending` holds the request line's end
        self.state = 'new'             # 'new': not counted in yet; 'head': waiting for a request; 'linger':
                                       # closing; 'refused': over a cap, closing; 'dropped': closed at once;
                                       # 'closed': closed and counted out
        self.deadline = self.quiet_until = 0.0
        self.dropped = 0               # bytes read and dropped while lingering


def framed_strictly(head):
    """Whether every header line of a request head is `name: value` as RFC 9112 §5 has it: no bare CR (a line
    end to some parsers), no line without a colon, no whitespace before the colon (§5.1: 400), no obs-fold line
    (§5.2). Any of these ends the header block early for some parsers and not for others, so that a proxy and this
    server could disagree about where a request ends."""
    if BARE_CR.search(head):
        return False
    lines = bytes(head).rstrip(b'\r\n').split(b'\n')[1:]
    return all(FIELD_LINE.fullmatch(line) for line in lines)


@functools.lru_cache(maxsize=4096)
def is_trusted(address, networks):
    """Whether an address (as a peer or a proxy names it) lies in one of the trusted networks."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if parsed.version == 6 and parsed.ipv4_mapped:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in networks)


class Front:
    """Reads every request's line and headers in one selector thread, so a client trickling them holds no
    worker thread; caps connections per address and in total, and requests in progress per client; lingers
    on close. Only whole request heads reach Paste's threads."""

    def __init__(self, config, run_request, waiting_room=None, clock=time.monotonic):
        self.config, self.run_request, self.waiting_room, self.clock = config, run_request, waiting_room, clock
        self.selector = selectors.DefaultSelector()
        self.wake_in, self.wake_out = socket.socketpair()
        self.wake_in.setblocking(False)
        self.selector.register(self.wake_in, selectors.EVENT_READ)
        self.arrivals = collections.deque()
        self.lock = threading.Lock()
        self.open = collections.Counter()      # open connections per peer address
        self.busy = collections.Counter()      # requests in progress per client
        self.total = self.refusing = 0
        self.warned = {}                       # client -> when its last refusal was logged
        threading.Thread(target=self.run, name='front', daemon=True).start()

    # --- Called from the accepting thread and from Paste's threads ---

    def admit(self, sock, peer):
        """A new connection: to the selector thread, or refused with 503 over MAX_CONNECTIONS. Its segments
        leave at once (TCP_NODELAY, as nginx's tcp_nodelay): else an answer's head and a body shorter than a
        segment met the client's delayed ACK, 40 ms for each cached preview of about 50 kB."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        connection = Connection(sock, peer)
        with self.lock:
            if self.total < self.config.MAX_CONNECTIONS:
                self.total += 1
            elif self.refusing < REFUSALS_LINGERING:
                self.refusing += 1
                connection.state = 'refused'
            else:
                connection.state = 'dropped'
        if connection.state == 'dropped':
            sock.close()
        else:
            self.hand_over(connection)

    def thread_done(self, connection):
        """A request no longer holds its worker thread (its answer may still be sent): the waiting room's next
        request may take one."""
        if connection.waited:
            connection.waited = False
            for let_in in self.waiting_room.leave(connection.client, connection.kind):
                self.run_request(let_in)

    def request_done(self, connection, keep_alive, read_whole):
        """A request's answer is sent: wait for the next head on this connection, or close it; lingering,
        as nginx does, only when the client may still be sending (its request was not read whole)."""
        self.release(connection.client)
        if keep_alive:
            self.hand_over(connection)
        elif read_whole and not connection.pending:
            connection.sock.close()
            self.forget(connection)
        else:
            connection.state = 'linger'
            self.hand_over(connection)

    def abandon(self, connection):
        """An answer that could not be sent whole: the connection is closed at once."""
        self.release(connection.client)
        with contextlib.suppress(OSError):
            connection.sock.close()
        self.forget(connection)

    def hand_over(self, connection):
        """Give a connection to the selector thread."""
        self.arrivals.append(connection)
        with contextlib.suppress(OSError):
            self.wake_out.send(b'.')

    def release(self, client):
        """One request of this client is over."""
        with self.lock:
            self.busy[client] -= 1
            if not self.busy[client]:
                del self.busy[client]

    # --- The selector thread ---

    def run(self):
        """Forever: read what arrives (closed connections are counted out first), take new and returning
        connections, act on deadlines."""
        while True:
            woken = False
            for key, _ in self.selector.select(self.seconds_to_next_deadline()):
                if key.fileobj is self.wake_in:
                    woken = True
                else:
                    self.guarded(self.readable, key.data)
            if woken:
                self.guarded(self.take_arrivals)
            self.guarded(self.expire)

    def guarded(self, step, connection=None):
        """One step of the loop; a fault costs at most the connection it concerns, never the front."""
        try:
            step(connection) if connection else step()
        except Exception:
            log.exception('The front failed on a connection')
            if connection:
                with contextlib.suppress(Exception):
                    self.close(connection)

    def seconds_to_next_deadline(self):
        """How long select may sleep: until the soonest deadline of a connection held (None: no deadline)."""
        deadlines = [self.next_deadline(key.data) for key in self.selector.get_map().values() if key.data]
        waiting = self.waiting_room and self.waiting_room.next_deadline()
        if waiting:
            deadlines.append(waiting)
        return max(0.0, min(deadlines) - self.clock()) if deadlines else None

    @staticmethod
    def next_deadline(connection):
        """When a connection waiting for its head, or lingering (at most until quiet), is given up."""
        return min(connection.deadline, connection.quiet_until) if connection.state != 'head' else connection.deadline

    def take_arrivals(self):
        """Take every connection handed over since the last wake-up."""
        with contextlib.suppress(BlockingIOError):
            while self.wake_in.recv(4096):
                pass
        while self.arrivals:
            self.guarded(self.take, self.arrivals.popleft())

    def take(self, connection):
        """Watch a new or returning connection: count it in, then wait for its head, refuse it or linger."""
        if not self.watch(connection):
            return
        if connection.state == 'new':
            self.count_in(connection)
        if connection.state == 'head':
            patience = PROXY_HEAD_SECONDS if connection.hurried else self.config.REQUEST_HEAD_TIMEOUT
            connection.deadline = self.clock() + patience
            self.examine_head(connection)
        elif connection.state == 'refused':
            self.answer_and_linger(connection, 503, extra=(('Retry-After', '5'),))
        elif connection.state == 'linger':
            self.start_lingering(connection)

    def trusts(self, peer):
        """Whether a peer may name the client it forwards for (TRUSTED_PROXIES; every peer with
        TRUST_PROXY_HEADERS)."""
        return self.config.TRUST_PROXY_HEADERS or is_trusted(peer, self.config.TRUSTED_NETWORKS)

    def count_in(self, connection):
        """A new connection counts against its address, or is refused over MAX_CONNECTIONS_PER_CLIENT. A trusted
        proxy's is not refused here: it counts against the client its request names (see dispatch), and beyond
        the cap must send that request at once."""
        trusted, cap = self.trusts(connection.peer), self.config.MAX_CONNECTIONS_PER_CLIENT
        if self.open[connection.peer] >= cap:
            self.close_those_closed_by(connection.peer, connection)
        with self.lock:
            if trusted or self.open[connection.peer] < cap:
                connection.hurried = self.open[connection.peer] >= cap
                self.open[connection.peer] += 1
                connection.state = 'head'
                return
            self.total -= 1
            if self.refusing < REFUSALS_LINGERING:
                self.refusing += 1
                connection.state = 'refused'
                return
        connection.state = 'dropped'
        self.selector.unregister(connection.sock)
        connection.sock.close()

    def close_those_closed_by(self, client, arriving):
        """Close the client's connections whose end it has closed and this thread not yet seen (under load
        it runs behind), so that the cap counts only connections really open. Not the arriving one: it is
        refused or served, then closed when its end is read."""
        for key in list(self.selector.get_map().values()):
            if key.data and key.data.counted == client and key.data is not arriving:
                try:
                    ended = key.data.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b''
                except BlockingIOError:
                    ended = False
                except OSError:
                    ended = True
                if ended:
                    self.close(key.data)

    def readable(self, connection):
        """Read what came: more of a head, or bytes to drop while lingering; the client's end closes it."""
        if connection.state == 'closed':
            return
        try:
            data = connection.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if connection.state == 'head':
            if not data:
                self.close(connection)
            else:
                self.unhurry(connection)
                connection.pending += data
                self.examine_head(connection)
        else:
            connection.dropped += len(data)
            connection.quiet_until = self.clock() + LINGER_QUIET_SECONDS
            if not data or connection.dropped >= LINGER_MAX_BYTES:
                self.close(connection)

    def examine_head(self, connection):
        """Dispatch a whole head; answer 414/431 for one too long. Empty lines before a request line are
        dropped (RFC 9112 §2.2). Each byte is searched once for the line's end and once for the head's."""
        pending = connection.pending
        if not connection.scanned and pending[:1] in (b'\r', b'\n'):
            del pending[:len(pending) - len(pending.lstrip(b'\r\n'))]
        end = HEAD_END.search(pending, max(0, connection.scanned - 3))
        if not connection.line_ended:
            connection.line_ended = pending.find(b'\n', connection.scanned, MAX_REQUEST_LINE + 1) >= 0
        connection.scanned = len(pending)
        if not connection.line_ended and len(pending) > MAX_REQUEST_LINE:
            self.answer_and_linger(connection, 414)
        elif (end.end() if end else len(pending)) > MAX_REQUEST_HEAD:
            self.answer_and_linger(connection, 431)
        elif end and not framed_strictly(pending[:end.end()]):
            self.answer_and_linger(connection, 400)
        elif end:
            self.dispatch(connection, pending[:end.end()])

    def dispatch(self, connection, head):
        """A whole head: to Paste's pool (through the waiting room if it may wait for a conversion), unless its
        client is over MAX_CONNECTIONS_PER_CLIENT or already has MAX_REQUESTS_PER_CLIENT in progress."""
        client = connection.client = self.client_of(connection, head)
        cap, connection.hurried = self.config.MAX_CONNECTIONS_PER_CLIENT, False
        self.count_against(connection, client)
        if self.open[client] > cap:
            self.close_those_closed_by(client, connection)
        with self.lock:
            over = 'connections' if self.open[client] > cap else \
                'requests' if self.busy[client] >= self.config.MAX_REQUESTS_PER_CLIENT else None
            if not over:
                self.busy[client] += 1
        if over:
            self.warn(client, '%s is at its cap of %s; requests beyond it are refused with 503', over)
            self.answer_and_linger(connection, 503, extra=(('Retry-After', '5' if over == 'connections' else '1'),))
            return
        self.selector.unregister(connection.sock)
        connection.sock.settimeout(self.config.SOCKET_TIMEOUT)    # bounds a silent client, reading or sending
        connection.scanned, connection.line_ended = 0, False
        connection.kind = self.waiting_room.needs_turn(bytes(head)) if self.waiting_room else None
        connection.waited = bool(connection.kind)
        if not connection.waited or self.waiting_room.enter(connection):
            self.run_request(connection)

    def count_against(self, connection, client):
        """Count the connection against the client its request names (a trusted proxy's carry many clients')."""
        with self.lock:
            if connection.counted != client:
                self.open[connection.counted] -= 1
                if not self.open[connection.counted]:
                    del self.open[connection.counted]
                self.open[client] += 1
                connection.counted = client

    def client_of(self, connection, head):
        """Who limits count a request under: the peer; when the peer is a trusted proxy, the client it names: the
        last X-Forwarded-For entry, the one the proxy itself appended (as nginx with real_ip_recursive off: what a
        client writes left of it is not believed, even from a private network), else X-Real-IP. A header never
        names this host itself (127.0.0.1, ::1), whose own checks must keep their share."""
        if not self.trusts(connection.peer):
            return connection.peer
        head = bytes(head)
        named = [address.strip() for line in FORWARDED_FOR.findall(head) for address in line.split(b',')]
        named = [address for address in named if address] or [address.strip() for address in REAL_IP.findall(head)]
        client = named[-1][:LONGEST_CLIENT].decode('latin-1') if named else ''
        return connection.peer if client in ('', '127.0.0.1', '::1') else client

    def answer_and_linger(self, connection, code, extra=()):
        """Send one of the front's own small answers (it fits the socket's buffer), then close lingering."""
        with contextlib.suppress(OSError):
            connection.sock.send(plain_answer(code, extra=extra))
        self.start_lingering(connection)

    def start_lingering(self, connection):
        """Stop sending, then drop what the client still sends for a bounded time before closing."""
        if connection.state == 'head':
            connection.state = 'linger'
        now = self.clock()
        connection.deadline = now + (LINGER_QUIET_SECONDS if connection.state == 'refused' else LINGER_SECONDS)
        connection.quiet_until = now + LINGER_QUIET_SECONDS
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(connection)

    def expire(self):
        """Act on passed deadlines: a partial head gets 408, a silent or lingering connection is closed, a request
        that waited its THUMBNAIL_QUEUE_WAIT for a thread gets 503."""
        now = self.clock()
        for connection in self.waiting_room.expired(now) if self.waiting_room else ():
            self.refuse_waiting(connection)
        for key in list(self.selector.get_map().values()):
            connection = key.data
            if connection and now >= self.next_deadline(connection):
                if connection.hurried and self.has_data(connection):
                    self.readable(connection)       # it began in time; this thread only ran late
                elif connection.state != 'head':
                    self.close(connection)
                elif connection.pending:
                    self.answer_and_linger(connection, 408)
                else:
                    self.close(connection)

    def unhurry(self, connection):
        """A hurried connection began its request in time: it now has the whole REQUEST_HEAD_TIMEOUT."""
        if connection.hurried:
            connection.hurried = False
            connection.deadline += self.config.REQUEST_HEAD_TIMEOUT - PROXY_HEAD_SECONDS

    @staticmethod
    def has_data(connection):
        """Whether bytes from the client wait in the socket unread."""
        try:
            return bool(connection.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def refuse_waiting(self, connection):
        """A request that waited in vain for a thread: 503 with Retry-After, then the connection lingers."""
        connection.waited = False
        self.release(connection.client)
        self.warn(connection.client, 'A request of %s waited %ss for a thread in vain; refused with 503',
                  self.waiting_room.wait)
        if self.watch(connection):
            self.answer_and_linger(connection, 503, extra=(('Retry-After', '5'),))

    def watch(self, connection):
        """Have the selector watch a connection again (False, and it is closed, when it cannot)."""
        try:
            connection.sock.setblocking(False)
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)
        except (OSError, ValueError):
            self.close(connection)
            return False
        return True

    def warn(self, client, message, *args):
        """Log a refusal of this client, unless one was logged in the last WARN_EVERY seconds."""
        now = self.clock()
        if now - self.warned.get(client, -WARN_EVERY) >= WARN_EVERY:
            if len(self.warned) >= 4096:
                self.warned.clear()
            self.warned[client] = now
            log.warning(message, printable(client), *args)

    def close(self, connection):
        """Stop watching a connection, close it and count it out."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection.sock)
        connection.sock.close()
        self.forget(connection)

    def forget(self, connection):
        """A closed connection no longer counts against its client or the total (once: close_those_closed_by may
        close a connection whose end the same select() also reported)."""
        with self.lock:
            if connection.state == 'closed':
                return
            if connection.state == 'refused':
                self.refusing -= 1
            else:
                self.total -= 1
            if connection.state not in ('refused', 'new'):
                self.open[connection.counted] -= 1
                if not self.open[connection.counted]:
                    del self.open[connection.counted]
            connection.state = 'closed'


class RequestReader:
    """What a request handler reads: the head the front read, then the body from the socket, which
    must average REQUEST_BODY_MIN_RATE bytes a second once REQUEST_BODY_GRACE seconds have passed."""

    def __init__(self, connection, config, clock=time.monotonic):
        self.connection, self.config, self.clock = connection, config, clock
        self.buffer, connection.pending = connection.pending, bytearray()
        self.started, self.received, self.delivered = clock(), 0, 0
        self.closed = False

    def read(self, size=-1):
        """Up to `size` bytes (what is buffered, else one read of the socket); all to the end for -1."""
        if size is None or size < 0:
            while self.fill():
                pass
            size = len(self.buffer)
        elif not self.buffer:
            self.fill()
        return self.take(min(size, len(self.buffer)))

    def readline(self, size=-1):
        """One line, at most `size` bytes."""
        limit = size if size is not None and size >= 0 else sys.maxsize
        while b'\n' not in self.buffer[:limit] and len(self.buffer) < limit and self.fill():
            pass
        end = self.buffer.find(b'\n', 0, limit)
        return self.take(min(limit, len(self.buffer)) if end < 0 else end + 1)

    def take(self, count):
        """Hand out the first `count` buffered bytes, counting them as delivered."""
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        self.delivered += count
        return data

    def fill(self):
        """Read once more from the socket; False at its end. TimeoutError when the client is too slow."""
        allowed = self.config.REQUEST_BODY_GRACE + self.received / self.config.REQUEST_BODY_MIN_RATE
        remaining = self.started + allowed - self.clock()
        if remaining <= 0:
            raise TimeoutError('the request arrives slower than REQUEST_BODY_MIN_RATE')
        self.connection.sock.settimeout(min(remaining, self.config.SOCKET_TIMEOUT))
        data = self.connection.sock.recv(CHUNK)
        self.received += len(data)
        self.buffer += data
        return bool(data)

    def leftover(self):
        """Bytes read past this request (a pipelined next one), for the front."""
        return self.buffer

    def close(self):
        """Paste closes the request's files at its end; the connection itself stays with the front."""
        self.closed = True


class SocketWriter:
    """The handler's output: what the kernel takes at once is sent, the rest kept (at most the answer's head and
    one piece of its body, as the handler then stops) for the Sender, so that no client's slow reading holds a
    worker thread."""

    def __init__(self, sock):
        self.sock, self.closed, self.unsent = sock, False, bytearray()
        self.sent, self.started = 0, None        # bytes the kernel took, and when the answer began

    def write(self, data):
        view = memoryview(data).cast('B')
        if self.started is None:
            self.started = time.monotonic()
        if not self.unsent:
            sent = send_now(self.sock, view)
            self.sent, view = self.sent + sent, view[sent:]
        self.unsent += view
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def send_now(sock, view):
    """Bytes of `view` the kernel takes without waiting (0 when its buffer is full)."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    try:
        return sock.send(view)
    except (BlockingIOError, InterruptedError):
        return 0


class Answer:
    """What is left to send of one answer: bytes the kernel did not take yet, the body's further pieces."""

    def __init__(self, connection, writer, chunks, result, keep_alive, read_whole):
        self.connection, self.unsent, self.chunks, self.result = connection, memoryview(bytes(writer.unsent)), \
            chunks, result
        self.keep_alive, self.read_whole = keep_alive, read_whole
        self.started, self.sent = writer.started, writer.sent     # the rate counts what the worker thread sent too
        self.progressed = time.monotonic()
        self.ended = False


class Sender:
    """Sends, in one thread of its own, the rest of every answer a client did not take at once, so that a slow
    reader holds a descriptor and one piece of its answer, never a worker thread. Pieces are read by a few reader
    threads (a store's stream may block), never by the sending thread. An answer must average ANSWER_MIN_RATE
    bytes a second after ANSWER_GRACE seconds and may never stall for SOCKET_TIMEOUT (time spent reading a piece
    not counted); a client slower than that is dropped."""

    PIECES_PER_TURN = 4          # sends to one connection before the others get their turn
    READERS = 4                  # threads that read the next pieces of answers

    def __init__(self, config, finished, abandoned, clock=time.monotonic):
        self.config, self.finished, self.abandoned, self.clock = config, finished, abandoned, clock
        self.selector = selectors.DefaultSelector()
        self.wake_in, self.wake_out = socket.socketpair()
        self.wake_in.setblocking(False)
        self.selector.register(self.wake_in, selectors.EVENT_READ)
        self.arrivals, self.pieces = collections.deque(), collections.deque()
        self.readers = concurrent.futures.ThreadPoolExecutor(self.READERS, thread_name_prefix='answer-reader')
        threading.Thread(target=self.run, name='sender', daemon=True).start()

    def take(self, answer):
        """From a worker thread: send the rest of this answer."""
        self.arrivals.append(answer)
        self.wake()

    def wake(self):
        with contextlib.suppress(OSError):
            self.wake_out.send(b'.')

    def run(self):
        while True:
            try:
                self.turn()
            except Exception:           # never the end of every answer in flight
                log.exception('The sender failed')

    def turn(self):
        """Send what the ready connections take, take new answers and pieces read, drop those too slow."""
        for key, _ in self.selector.select(self.seconds_to_next_deadline()):
            if key.fileobj is self.wake_in:
                with contextlib.suppress(BlockingIOError):
                    while self.wake_in.recv(4096):
                        pass
            else:
                self.guarded(self.send_more, key.data)
        while self.arrivals:
            self.guarded(self.start, self.arrivals.popleft())
        while self.pieces:
            answer, piece, failed = self.pieces.popleft()
            self.guarded(self.go_on, answer, piece, failed)
        now = self.clock()
        for key in list(self.selector.get_map().values()):
            if key.data and now >= self.deadline(key.data):
                self.end(key.data, complete=False)

    def guarded(self, step, answer, *args):
        """One answer's step; a fault costs that answer its connection, never the other answers."""
        try:
            step(answer, *args)
        except Exception:
            log.exception('An answer failed while it was sent')
            self.end(answer, complete=False)

    def start(self, answer):
        self.watch(answer)
        self.send_more(answer)

    def watch(self, answer):
        self.selector.register(answer.connection.sock, selectors.EVENT_WRITE, answer)

    def deadline(self, answer):
        """When an answer that is too slow is given up: stalled for SOCKET_TIMEOUT, or below the minimum rate."""
        config = self.config
        return min(answer.progressed + config.SOCKET_TIMEOUT,
                   answer.started + config.ANSWER_GRACE + answer.sent / config.ANSWER_MIN_RATE)

    def seconds_to_next_deadline(self):
        deadlines = [self.deadline(key.data) for key in self.selector.get_map().values() if key.data]
        return max(0.0, min(deadlines) - self.clock()) if deadlines else None

    def send_more(self, answer):
        """Send what the kernel takes now, a few sends at most; then ask for the next piece, or end the answer."""
        for _ in range(self.PIECES_PER_TURN):
            if not answer.unsent:
                break
            try:
                sent = send_now(answer.connection.sock, answer.unsent)
            except OSError:
                self.end(answer, complete=False)
                return
            if not sent:
                return
            answer.sent, answer.progressed, answer.unsent = answer.sent + sent, self.clock(), answer.unsent[sent:]
        if answer.unsent:
            return
        if answer.chunks is None:
            self.end(answer, complete=True)
            return
        self.selector.unregister(answer.connection.sock)     # not watched (nor timed) while its piece is read
        self.readers.submit(self.read_piece, answer)

    def read_piece(self, answer):
        """In a reader thread: the body's next piece (None at its end), handed to the sending thread."""
        try:
            piece, failed = next(answer.chunks, None), False
        except Exception:
            log.exception('An answer failed while its body was read')
            piece, failed = None, True
        self.pieces.append((answer, piece, failed))
        self.wake()

    def go_on(self, answer, piece, failed):
        """A piece read: send it, or end the answer (whole at the body's end, cut off after a failed read)."""
        if failed or piece is None:
            self.end(answer, complete=not failed)
            return
        answer.unsent, answer.progressed = memoryview(piece).cast('B'), self.clock()
        self.watch(answer)
        self.send_more(answer)

    def end(self, answer, complete):
        """Stop sending, once: the body's source is closed; the connection goes back to the front whole, or is
        closed."""
        if answer.ended:
            return
        answer.ended = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(answer.connection.sock)
        if hasattr(answer.result, 'close'):
            with contextlib.suppress(Exception):
                answer.result.close()
        if complete:
            self.finished(answer.connection, answer.keep_alive, answer.read_whole)
        else:
            self.abandoned(answer.connection)


class RequestHandler(httpserver.WSGIHandler):
    """Paste's handler for one request whose head the front has read; the connection goes back to the front."""
    protocol_version = 'HTTP/1.1'      # keep-alive: an idle connection costs the front a descriptor, not a thread

    def handle_expect_100(self):
        """Paste sends 100 Continue only when the body is first read, so a refusal comes before the upload."""
        return True

    def setup(self):
        """The request's files over the connection the front handed over (it owns the socket)."""
        self.connection = self.request.sock
        self.rfile = RequestReader(self.request, self.server.config)
        self.wfile = SocketWriter(self.connection)
        self.body_end = None
        self.rest = None, None            # (the body's further pieces, the app's result) left to the Sender

    def handle(self):
        """One request only: a kept-alive connection waits for its next head in the front, not here."""
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.parse_request():
                return
            refusal = self.framing_refusal()
            if refusal:
                self.send_error(refusal)
                return
            self.body_end = self.rfile.delivered + int(self.headers.get('Content-Length', '0'))
            self.wsgi_execute(environ={'wast.client': self.request.client})
        except (OSError, ValueError):
            self.close_connection = True

    def framing_refusal(self):
        """411 for a chunked body (Paste reads Content-Length only), 400 for a Content-Length that is not
        one number: the end of either body is unknown here, so its bytes could be taken for a next request."""
        if 'Transfer-Encoding' in self.headers:
            return 411
        lengths = self.headers.get_all('Content-Length', [])
        if len(lengths) > 1 or not all(re.fullmatch(r'[0-9]+', length) for length in lengths):
            return 400
        return None

    def wsgi_execute(self, environ=None):
        """Paste's, but an answer stops here once the client has not taken a piece at once: the Sender sends its
        rest (and closes the app's result), and this thread is free."""
        self.wsgi_setup(environ)
        try:
            result = self.server.wsgi_application(self.wsgi_environ, self.wsgi_start_response)
            try:
                chunks = iter(result)
                for chunk in chunks:
                    self.wsgi_write_chunk(chunk)
                    if self.wfile.unsent:
                        self.rest, result = (chunks, result), None
                        return
                if not self.wsgi_headers_sent:
                    self.wsgi_write_chunk(b'')
            finally:
                if hasattr(result, 'close'):
                    result.close()
        except OSError as error:
            self.wsgi_connection_drop(error, environ)
        except Exception:
            if not self.wsgi_headers_sent:
                self.wsgi_curr_headers = ('500 Internal Server Error', [('Content-Type', 'text/plain; charset=UTF-8'),
                                                                        ('Content-Length', '22')])
                self.wsgi_write_chunk(b'Internal server error.')
            raise

    def wsgi_setup(self, environ=None):
        """Paste's environ, with PATH_INFO as PEP 3333 has it: the path's bytes read as latin-1 (Paste reads
        them as UTF-8, which made a path with a character beyond latin-1 a 500 in Bottle); REQUEST_URI keeps
        the target as sent, where an encoded slash is still told from a separator."""
        super().wsgi_setup(environ)
        self.wsgi_environ['REQUEST_URI'] = self.path
        path = unquote(urlsplit(self.path).path, encoding='latin-1')
        normal = posixpath.normpath(path) if path else '/'
        self.wsgi_environ['PATH_INFO'] = normal + '/' if path.endswith('/') and normal != '/' else normal

    def body_read(self):
        """Whether the request was read to the end its Content-Length declares."""
        return self.body_end is not None and self.rfile.delivered >= self.body_end

    def end_headers(self):
        """An answer given before the body was read whole says the connection closes (RFC 9110 §10.1.1), so a
        client that held the body back after Expect: 100-continue sends no next request into the lingering."""
        if not self.close_connection and not self.body_read():
            self.send_header('Connection', 'close')
        super().end_headers()

    def wsgi_connection_drop(self, exce, environ=None):
        """The client went away while answered: nothing to keep alive."""
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Paste's own answers (a bad request line, headers too long) are stamped like ours: plain text
        naming the status only (never the request's bytes), with X-Timestamp and CORS."""
        self.close_connection = True
        self.wfile.write(plain_answer(code, with_body=self.command != 'HEAD'))


class FrontedPasteServer(httpserver.WSGIThreadPoolServer):
    """Paste's thread-pool server with the front before it: Paste accepts, the front reads heads and
    enforces the caps, Paste's threads run whole requests."""

    def __init__(self, app, config, waiting_room=None):
        self.config = config
        self.address_family = socket.AF_INET6 if ':' in config.HOST else socket.AF_INET
        super().__init__(app, (config.HOST, config.PORT), RequestHandler, nworkers=config.THREADS,
                         request_queue_size=64, threadpool_options={'kill_thread_limit': 0,
                                                                    'hung_thread_limit': 3600})
        self.front = Front(config, lambda connection: self.thread_pool.add_task(
            lambda: self.serve_request(connection)), waiting_room)
        self.sender = Sender(config, self.front.request_done, self.front.abandon)

    def process_request(self, request, client_address):
        self.front.admit(request, client_address)

    def serve_request(self, connection):
        """Run one request in this pool thread, then give the connection back to the front, or what the client
        has not yet taken of the answer to the Sender."""
        keep_alive = read_whole = False
        writer, (chunks, result) = None, (None, None)
        try:
            handler = self.RequestHandlerClass(connection, (connection.peer, 0), self)
            read_whole = handler.body_read()
            keep_alive = read_whole and not handler.close_connection
            connection.pending = handler.rfile.leftover()
            writer, (chunks, result) = handler.wfile, handler.rest
        except Exception:
            log.exception('A request failed outside the application')
        self.front.thread_done(connection)
        if writer is not None and writer.unsent:
            self.sender.take(Answer(connection, writer, chunks, result, keep_alive, read_whole))
        else:
            self.front.request_done(connection, keep_alive, read_whole)
