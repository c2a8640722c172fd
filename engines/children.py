"""Child processes that stay for the next job, shared by every engine that runs its work apart from the server's
threads (libvips for IIIF, exifread for metadata). Starting a child costs an interpreter and its libraries (50 ms
for libvips); keeping a few costs nothing while idle. Each speaks engines/framing.py: it says it is ready, then
takes one job message at a time, may ask the server for what it needs meanwhile, and ends the job with a message
that says `ok`."""

import json
import os
import select
import signal
import subprocess
import threading
import time
import typing

from config import HERE
from engines.framing import LONGEST_LINE, encoded

Serve = typing.Callable[[dict, bytes], tuple[dict, bytes]]     # a child's request answered: (message, data)


class ChildFailed(Exception):
    """A child could not start, ended, or broke the framing. `at_start`: it never became ready (the machine, not the
    job, is at fault); `killed`: it was killed (by the kernel's out-of-memory killer, say)."""

    def __init__(self, reason: str, at_start: bool = False, killed: bool = False) -> None:
        super().__init__(reason)
        self.at_start, self.killed = at_start, killed


class ChildTimedOut(Exception):
    """A job overran its deadline; its child was killed."""


class ChildPool:
    """Children running `command` (a `python -m` module), at most `workers` kept idle, each under `limit_child` in
    `environment` (None: the server's), none answering more than `longest_data` bytes. One that overruns its
    deadline is killed, one that fails or ends is not used again, and each is replaced after `jobs_per_child` jobs."""
    jobs_per_child = 200
    start_timeout = 30           # seconds a new child may take to say it is ready (a busy machine: not the job's fault)

    def __init__(self, command: list[str], workers: int, environment: dict | None = None,
                 limit_child: typing.Callable | None = None, longest_data: int = 0) -> None:
        self.command, self.workers, self.environment, self.limit_child = command, workers, environment, limit_child
        self.longest_data = longest_data
        self.idle, self.lock = [], threading.Lock()

    def run(self, job: str, args: list, folder: str | None, deadline: float,
            serve: Serve | None = None) -> tuple[dict, bytes]:
        """(the child's last message for the job, its data). `serve(message, data)` answers each request the child
        makes meanwhile with (message, data); the time it takes does not count against the deadline (a slow store
        is not the job's fault), nor does starting a child. ChildTimedOut when the deadline passes (the child is
        killed), ChildFailed when the child cannot start, ends or breaks the framing. A child is kept for the next
        job only after an answer `ok` with nothing sent beyond it."""
        started = time.monotonic()
        child = self._child()
        deadline += time.monotonic() - started
        try:
            self._send(child, {'job': job, 'args': args, 'folder': folder}, b'', deadline)
            while True:
                message, data = self._receive(child, deadline)
                if 'ok' in message:
                    break
                if serve is None:
                    raise ChildFailed('the child asked for what nobody serves')
                started = time.monotonic()
                reply, reply_data = served(serve, message, data)
                deadline += time.monotonic() - started
                self._send(child, reply, reply_data, deadline)
        except ServingFailed as failed:         # the server's own fault (a store unreachable): raised as it is
            self._end(child)
            raise failed.error from None
        except TimeoutError:
            self._end(child)
            raise ChildTimedOut() from None
        except (OSError, ValueError, KeyError, TypeError, ChildFailed) as error:
            killed = child.poll() == -signal.SIGKILL          # by another before we end it: the OOM killer, say
            self._end(child)
            raise ChildFailed(str(error), killed=killed) from None
        child.jobs += 1
        with self.lock:
            if (message.get('ok') and not child.received and child.jobs < self.jobs_per_child
                    and len(self.idle) < self.workers):
                self.idle.append(child)
                child = None
        if child is not None:
            self._end(child)
        return message, data

    def _child(self) -> subprocess.Popen:
        """An idle child still alive, or a new one once it has said it is ready."""
        with self.lock:
            while self.idle:
                child = self.idle.pop()
                if child.poll() is None:
                    return child
        try:
            child = subprocess.Popen(self.command, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.environment, preexec_fn=self.limit_child, bufsize=0)
        except OSError as error:
            raise ChildFailed(f'could not start {self.command[-1]}: {error}', at_start=True) from None
        os.set_blocking(child.stdin.fileno(), False)
        os.set_blocking(child.stdout.fileno(), False)
        child.jobs, child.received = 0, bytearray()
        try:
            ready, _data = self._receive(child, time.monotonic() + self.start_timeout)
            if ready.get('ready'):
                return child
        except (TimeoutError, OSError, ValueError, ChildFailed):
            pass
        self._end(child)
        raise ChildFailed(f'{self.command[-1]} did not start within {self.start_timeout} s', at_start=True)

    def _send(self, child: subprocess.Popen, message: dict, data: bytes, deadline: float) -> None:
        view = memoryview(encoded(message, data))
        while view:
            wait_for(child.stdin.fileno(), deadline, reading=False)
            try:
                view = view[os.write(child.stdin.fileno(), view):]
            except BlockingIOError:
                continue

    def _receive(self, child: subprocess.Popen, deadline: float) -> tuple[dict, bytes]:
        """The child's next message and its data, read before the deadline (bounded in length)."""
        line = self._read_until(child, deadline, lambda: child.received.find(b'\n') + 1, LONGEST_LINE + 1)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise ChildFailed('the child sent something else than JSON') from None
        if not isinstance(message, dict):
            raise ChildFailed('the child sent something else than a message')
        count = message.get('bytes', 0)
        if not isinstance(count, int) or not 0 <= count <= self.longest_data:
            raise ChildFailed('the child announced more bytes than it may send')
        data = self._read_until(child, deadline, lambda: count if len(child.received) >= count else 0, count)
        return message, data

    @staticmethod
    def _read_until(child: subprocess.Popen, deadline: float, complete: typing.Callable, most: int) -> bytes:
        """The first `complete()` bytes of what the child sent (0: not yet), reading more until then."""
        while True:
            length = complete()
            if length or most == 0:
                taken = bytes(child.received[:length])
                del child.received[:length]
                return taken
            if len(child.received) >= most:
                raise ChildFailed('the child sent more than a message may hold')
            wait_for(child.stdout.fileno(), deadline, reading=True)
            try:
                chunk = os.read(child.stdout.fileno(), 64 * 1024)
            except BlockingIOError:
                continue
            if not chunk:
                raise ChildFailed('the child ended without an answer')
            child.received += chunk

    @staticmethod
    def _end(child: subprocess.Popen) -> None:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


class ServingFailed(Exception):
    """What serving a child's request raised (other than ChildFailed), carried past the pool's own handling."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def served(serve: Serve | None, message: dict, data: bytes) -> tuple[dict, bytes]:
    """serve(message, data), its failures other than the child's own (ChildFailed) carried as ServingFailed."""
    try:
        return serve(message, data)
    except ChildFailed:
        raise
    except Exception as error:
        raise ServingFailed(error) from error


def wait_for(descriptor: int, deadline: float, reading: bool) -> None:
    """Until a pipe can be read (or written); TimeoutError once the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0 or not any(select.select([descriptor] if reading else [], [] if reading else [descriptor], [], left)):
        raise TimeoutError()
