"""EXIF for getmetadata, read in child processes (engines/exif_child.py) so that a parser bug costs one child,
never a server thread: at most METADATA_WORKERS at once, each bounded in time, memory, bytes read and answer
size."""

import collections
import hashlib
import io
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

from config import HERE
from engines.exif_child import DONE, JOB, LENGTH, READ, READ_REQUEST, READY, TOO_LARGE
from errors import MetadataBusy
from files import CHUNK

log = logging.getLogger('web_asset_server')
logging.getLogger('exifread').setLevel(logging.CRITICAL)

CHILD_START_TIMEOUT = 30         # seconds a new child may take to start (a busy machine is not the file's fault)

HEAD = 64 * 1024                 # the first bytes of a file, read before a child is asked (its first read)


class MetadataLimitExceeded(Exception):
    """A file's metadata could not be read within the limits (time, memory, bytes read, answer size)."""


class MetadataReader:
    """Reads EXIF in child processes, at most METADATA_WORKERS at once, each bounded in time and memory.

    exifread runs in a child so that a parser bug (an endless loop, a blow-up) costs one child, never a
    server thread; the child reads the file only through its pipe from here, so it never touches the
    storage and reads at most METADATA_MAX_READ bytes. Children stay for the next file unless they failed.
    Files found beyond the limits are remembered by their first bytes and size, so asking again is cheap.
    """
    remember_for, remembered = 600, 1024     # seconds and number of files found beyond the limits

    def __init__(self, config):
        self.timeout, self.wait, self.max_read = config.METADATA_TIMEOUT, config.METADATA_WAIT, config.METADATA_MAX_READ
        self.limits = [str(config.METADATA_MEMORY_LIMIT), str(config.METADATA_TIMEOUT),
                       str(config.METADATA_MAX_VALUE), str(config.METADATA_MAX_ANSWER)]
        self.slots = threading.BoundedSemaphore(config.METADATA_WORKERS)
        self.admitted = threading.BoundedSemaphore(config.METADATA_WORKERS + config.THREADS // 4)  # running, waiting
        self.guard = threading.Lock()
        self.idle, self.running, self.beyond = [], {}, collections.OrderedDict()

    def groups(self, readable):
        """Specify 6's groups of an open file's EXIF; 503 with Retry-After when every slot stays busy."""
        size = readable.seek(0, io.SEEK_END)
        readable.seek(0)
        head = readable.read(HEAD)
        key = (size, hashlib.sha256(head).digest())
        self._refuse_if_known(key)
        if not self.admitted.acquire(blocking=False):
            self._busy()
        try:
            with self.guard:
                other = self.running.get(key)
                mine = None if other else self.running.setdefault(key, threading.Event())
            if other is not None:                # the same bytes are being read: wait for that verdict
                other.wait(self.wait + self.timeout)
                self._refuse_if_known(key)
            try:
                return self._in_slot(readable, size, head, key)
            finally:
                if mine is not None:
                    with self.guard:
                        del self.running[key]
                    mine.set()
        finally:
            self.admitted.release()

    def _in_slot(self, readable, size, head, key):
        if not self.slots.acquire(timeout=self.wait):
            self._busy()
        try:
            return self._extract(readable, size, head)
        except MetadataLimitExceeded:
            with self.guard:
                self.beyond[key] = time.monotonic() + self.remember_for
                while len(self.beyond) > self.remembered:
                    self.beyond.popitem(last=False)
            raise
        finally:
            self.slots.release()

    def _refuse_if_known(self, key):
        with self.guard:
            if self.beyond.get(key, 0) > time.monotonic():
                raise MetadataLimitExceeded('these bytes were beyond the limits a short while ago')

    def _busy(self):
        raise MetadataBusy(self.timeout)

    def _extract(self, readable, size, head):
        """Run one file through a child; the child is kept for the next file unless it failed."""
        child = self._child()
        try:
            text, overrun = self._converse(child, readable, size, head, time.monotonic() + self.timeout)
        except BaseException:
            child.kill()
            child.wait()
            raise
        with self.guard:
            self.idle.append(child)
        if overrun:
            raise MetadataLimitExceeded('it read more than METADATA_MAX_READ')
        try:
            return json.loads(text)
        except ValueError:
            raise MetadataLimitExceeded('the reader answered something else than JSON') from None

    def _child(self):
        """An idle child still alive, or a new one once it is ready (its start is not the file's time)."""
        with self.guard:
            while self.idle:
                child = self.idle.pop()
                if child.poll() is None:
                    return child
        try:
            child = subprocess.Popen([sys.executable, '-m', 'engines.exif_child', *self.limits],
                                     cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as error:
            log.warning('could not start a metadata reader: %s', error)
            self._busy()
        os.set_blocking(child.stdin.fileno(), False)
        os.set_blocking(child.stdout.fileno(), False)
        try:
            if receive(child.stdout.fileno(), 1, time.monotonic() + CHILD_START_TIMEOUT) == READY:
                return child
        except MetadataLimitExceeded:
            pass
        log.warning('a metadata reader did not start within %s s', CHILD_START_TIMEOUT)
        child.kill()
        child.wait()
        self._busy()

    def _converse(self, child, readable, size, head, deadline):
        """Serve the child's reads until it answers: (its JSON, whether it wanted more than METADATA_MAX_READ).

        Time spent reading the storage moves the deadline: a slow store is not the file's fault.
        """
        send(child.stdin.fileno(), JOB.pack(size), deadline)
        served, overrun = 0, False
        while True:
            kind = receive(child.stdout.fileno(), 1, deadline)
            if kind == TOO_LARGE:
                raise MetadataLimitExceeded('more than METADATA_MEMORY_LIMIT or METADATA_MAX_ANSWER')
            if kind == DONE:
                length = LENGTH.unpack(receive(child.stdout.fileno(), LENGTH.size, deadline))[0]
                return receive(child.stdout.fileno(), length, deadline), overrun
            if kind != READ_REQUEST:
                raise MetadataLimitExceeded('the reader broke off')
            offset, length = READ.unpack(receive(child.stdout.fileno(), READ.size, deadline))
            length = min(length, CHUNK)
            overrun = overrun or served + length > self.max_read
            if overrun:
                data = b''
            elif offset + length <= len(head) or len(head) == size:
                data = head[offset:offset + length]
            else:
                started = time.monotonic()
                readable.seek(offset)
                data = readable.read(length)
                deadline += time.monotonic() - started
            served += len(data)
            send(child.stdin.fileno(), LENGTH.pack(len(data)) + data, deadline)


def receive(descriptor, count, deadline):
    """Exactly `count` bytes from a non-blocking pipe before the deadline."""
    data = bytearray()
    while len(data) < count:
        wait_for_pipe(descriptor, deadline, reading=True)
        try:
            chunk = os.read(descriptor, count - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            raise MetadataLimitExceeded('the reader ended without an answer')
        data += chunk
    return bytes(data)


def send(descriptor, data, deadline):
    """All of `data` into a non-blocking pipe before the deadline."""
    view = memoryview(data)
    while view:
        wait_for_pipe(descriptor, deadline, reading=False)
        try:
            view = view[os.write(descriptor, view):]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            raise MetadataLimitExceeded('the reader ended without an answer') from None


def wait_for_pipe(descriptor, deadline, reading):
    left = deadline - time.monotonic()
    ready = select.select([descriptor] if reading else [], [] if reading else [descriptor], [], max(left, 0))
    if not any(ready):
        raise MetadataLimitExceeded('it took longer than METADATA_TIMEOUT')
