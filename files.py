"""Local files: written durably (a temporary, flushed, synced, renamed), temporaries swept after a crash, one
lock per key, and a seekable reader over bytes that come from elsewhere (a store, a pipe)."""

import contextlib
import errno
import io
import os
import secrets
import shutil
import threading

from names import TEMP_PREFIX

CHUNK = 256 * 1024               # Bytes read or written at a time when streaming.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)     # what a full disk (or quota, or file-size limit) raises


def fsync_folder(folder):
    """Make a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_temp_file(folder):
    """A new temporary file in `folder` (made as needed) that no client name can reach."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{TEMP_PREFIX}{secrets.token_hex(8)}.part')
    return path, open(path, 'xb')


@contextlib.contextmanager
def durable_file(path):
    """A file written in place complete or not at all: yields a temporary beside `path` (its folder made as
    needed), then syncs it, renames it to `path` and syncs the folder; an error removes it."""
    temp, out = make_temp_file(os.path.dirname(path))
    try:
        with out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        remove_quietly(temp)
        raise
    fsync_folder(os.path.dirname(path))


def write_durably(path, data):
    """Put a small file in place complete (see durable_file)."""
    with durable_file(path) as out:
        out.write(data)


def remove_quietly(path):
    """Remove a file that may already be gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def sweep_folder(folder, cutoff):
    """Remove our temporary files and folders in `folder` last touched before `cutoff`."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                remove_quietly(entry.path)


def file_identity(path):
    """What changes when a file is replaced or rewritten."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


class KeyedLocks:
    """One lock per key, made on first use and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}

    @contextlib.contextmanager
    def __call__(self, key, timeout=None):
        """Hold the key's lock; TimeoutError when it is not free within `timeout` seconds (None: wait)."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f'{key!r} stayed locked')
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


class SeekableReader(io.RawIOBase):
    """A read-only, seekable file of known size whose bytes come from elsewhere (a store, a pipe).

    A subclass supplies fetch(position, size) -> bytes; reading, seeking and the end are shared.
    """

    def __init__(self, size):
        super().__init__()
        self.size, self.position = size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer):
        if self.position >= self.size or not len(buffer):
            return 0
        data = self.fetch(self.position, min(len(buffer), self.size - self.position))
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def stream_file(handle, length):
    """`length` bytes of an open file from where it stands, a piece at a time; the file closed at the end."""
    with handle:
        while length > 0:
            chunk = handle.read(min(CHUNK, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
