"""EXIF for getmetadata, read in child processes (engines/exif_child.py) so that a parser bug costs one child,
never a server thread: at most METADATA_WORKERS at once, each bounded in time, memory, bytes read and answer
size."""

import hashlib
import io
import json
import logging
import sys
import threading
import time
import types
import typing

import cachetools

from engines.children import ChildFailed, ChildPool, ChildTimedOut
from errors import MetadataBusy
from files import CHUNK

log = logging.getLogger('web_asset_server')


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

    def __init__(self, config: types.SimpleNamespace) -> None:
        self.timeout, self.wait, self.max_read = config.METADATA_TIMEOUT, config.METADATA_WAIT, config.METADATA_MAX_READ
        self.limits = [str(config.METADATA_MEMORY_LIMIT), str(config.METADATA_TIMEOUT),
                       str(config.METADATA_MAX_VALUE), str(config.METADATA_MAX_ANSWER)]
        self.slots = threading.BoundedSemaphore(config.METADATA_WORKERS)
        self.admitted = threading.BoundedSemaphore(config.METADATA_WORKERS + config.THREADS // 4)  # running, waiting
        self.guard = threading.Lock()
        self.running = {}
        self.children = ChildPool([sys.executable, '-m', 'engines.exif_child', *self.limits], config.METADATA_WORKERS,
                                  longest_data=config.METADATA_MAX_ANSWER)
        self.beyond = cachetools.TTLCache(self.remembered, self.remember_for)    # keys of files beyond the limits

    def groups(self, readable: typing.BinaryIO) -> list:
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

    def _in_slot(self, readable: typing.BinaryIO, size: int, head: bytes, key: typing.Hashable) -> list:
        if not self.slots.acquire(timeout=self.wait):
            self._busy()
        try:
            return self._extract(readable, size, head)
        except MetadataLimitExceeded:
            with self.guard:
                self.beyond[key] = True
            raise
        finally:
            self.slots.release()

    def _refuse_if_known(self, key: typing.Hashable) -> None:
        with self.guard:
            if key in self.beyond:
                raise MetadataLimitExceeded('these bytes were beyond the limits a short while ago')

    def _busy(self) -> typing.NoReturn:
        raise MetadataBusy(self.timeout)

    def _extract(self, readable: typing.BinaryIO, size: int, head: bytes) -> list:
        """Run one file through a child: its groups; MetadataLimitExceeded for a file beyond the limits."""
        served = [0, False]                 # bytes served, whether the child wanted more than METADATA_MAX_READ

        def serve(message: dict, _data: bytes) -> tuple[dict, bytes]:
            """The bytes a child asks for, from the first ones read already or from the storage."""
            asked = message.get('read')
            if not (isinstance(asked, list) and len(asked) == 2 and all(type(n) is int and n >= 0 for n in asked)):
                raise ChildFailed('the reader broke off')
            offset, length = asked
            length = min(length, CHUNK)
            served[1] = served[1] or served[0] + length > self.max_read
            if served[1]:
                data = b''
            elif offset + length <= len(head) or len(head) == size:
                data = head[offset:offset + length]
            else:
                readable.seek(offset)
                data = readable.read(length)
            served[0] += len(data)
            return {}, data
        try:
            answer, text = self.children.run('exif', [size], None, time.monotonic() + self.timeout, serve)
        except ChildTimedOut:
            raise MetadataLimitExceeded('it took longer than METADATA_TIMEOUT') from None
        except ChildFailed as failure:
            if failure.at_start:
                log.warning('a metadata reader could not start: %s', failure)
                self._busy()
            raise MetadataLimitExceeded('the reader ended without an answer') from None
        if not answer.get('ok'):
            raise MetadataLimitExceeded('more than METADATA_MEMORY_LIMIT or METADATA_MAX_ANSWER')
        if served[1]:
            raise MetadataLimitExceeded('it read more than METADATA_MAX_READ')
        try:
            return json.loads(text)
        except ValueError:
            raise MetadataLimitExceeded('the reader answered something else than JSON') from None
