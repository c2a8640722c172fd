"""Attachments in folders under BASE_DIR, in the upstream layout (STORAGE = 'disk').

An original is in place only when complete (a staged temporary, synced, renamed, the folder synced), and so is
its checksum's catalogue entry, put in place just before it (an entry keeps the checksum it replaces, so a crash
between the two renames leaves the old bytes and a record of them); a lock per original orders replacing,
deleting and putting a derivative in place, so no derivative of old bytes lands after the new ones. Small files
served often are answered from memory while their stat is unchanged.
"""

import contextlib
import errno
import os
import shutil
import threading
import time

import cachetools

from checksums import checksum_from_text
from files import (CHUNK, KeyedLocks, durable_file, file_identity, fsync_folder, remove_quietly, stream_file,
                   sweep_folder, write_durably)
from kinds import kind_of
from names import CATALOGUE_DIR, RECORD_FOLDERS, Identity, derivative_source, name_problem
from storages.base import TRASH_ID, Found, Storage, Trashed, new_trash_id, trashed_from_text

CATALOGUE_ENTRY = 4096           # bytes read of a catalogue entry: one is about 250

FILE_LOCKS = KeyedLocks()        # Held while an original is replaced or deleted, or a derivative of it put in place.


class DiskStorage(Storage):
    """Attachments in folders under BASE_DIR, in the upstream layout."""

    def __init__(self, config):
        super().__init__(config)
        self.base = config.BASE_DIR

    def path(self, parts):
        return os.path.join(self.base, *parts)

    def original_path(self, coll, name):
        return self.path(self.original_parts(coll, name))

    def exists(self, coll, name):
        return os.path.isfile(self.original_path(coll, name))

    def save(self, coll, name, staged, checksum):
        """Move a complete staged file into place durably, its checksum's entry just before it; then drop the old
        bytes' derivatives and index entry."""
        target = self.original_path(coll, name)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        with FILE_LOCKS(target):
            old = self.recorded_checksum(self.original_parts(coll, name))
            replacing = os.path.isfile(target)
            self._index(coll, checksum.sha256, name)
            self._catalogue(coll, name, checksum, old)
            try:
                os.replace(staged, target)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                self._copy_into(staged, target)
            fsync_folder(folder)
            if old and old.sha256 != checksum.sha256:
                self._unindex(coll, old.sha256, name)
            self._delete_derivatives(coll, name)
        return replacing

    def _copy_into(self, source, target):
        """Copy across file systems: to a temporary beside the target, then rename; a failed copy leaves none."""
        with durable_file(target) as out, open(source, 'rb') as src:
            shutil.copyfileobj(src, out, CHUNK)
        os.remove(source)

    def delete(self, coll, name):
        """Remove an original, its checksum and exactly its own derivatives; False when it is not there."""
        target = self.original_path(coll, name)
        with FILE_LOCKS(target):
            old = self.recorded_checksum(self.original_parts(coll, name))
            try:
                os.remove(target)
            except FileNotFoundError:
                return False
            self._forget_checksum(coll, name, old)
            self._delete_derivatives(coll, name)
        return True

    def _forget_checksum(self, coll, name, checksum):
        """Remove the catalogue and index entries of an original no longer stored."""
        remove_quietly(self.path(self.catalogue_parts(self.original_parts(coll, name))))
        if checksum:
            self._unindex(coll, checksum.sha256, name)

    # --- The trash ------------------------------------------------------------------------------------------------

    def trash(self, coll, name):
        """The record is put in place first, then the bytes renamed beside it (one file system: nothing copied);
        a crash between leaves a record without bytes, which is no entry."""
        target = self.original_path(coll, name)
        with FILE_LOCKS(target):
            try:
                size = os.path.getsize(target)
            except FileNotFoundError:
                return None
            checksum = self.recorded_checksum(self.original_parts(coll, name))
            now = time.time()
            entry = Trashed(new_trash_id(now), name, now, size, checksum)
            folder = self.path(self.trash_parts(coll))
            write_durably(os.path.join(folder, entry.id + '.json'), entry.as_text().encode('utf-8'))
            os.rename(target, os.path.join(folder, entry.id))
            fsync_folder(folder)
            fsync_folder(os.path.dirname(target))
            self._forget_checksum(coll, name, checksum)
            self._delete_derivatives(coll, name)
        return entry

    def trashed(self, coll):
        folder = self.path(self.trash_parts(coll))
        try:
            names = set(os.listdir(folder))
        except FileNotFoundError:
            return
        ids = [n for n in names if TRASH_ID.fullmatch(n) and n + '.json' in names]
        entries = (self._trashed(coll, entry_id) for entry_id in ids)
        yield from sorted((entry for entry in entries if entry), key=lambda entry: (entry.deleted, entry.id))

    def _trashed(self, coll, entry_id):
        try:
            with open(self.path(self.trash_parts(coll, entry_id + '.json')), 'rb') as record:
                return trashed_from_text(entry_id, record.read(CATALOGUE_ENTRY))
        except FileNotFoundError:
            return None

    def restore(self, coll, entry_id):
        """The checksum's entry first, then the bytes renamed back, then the record removed."""
        entry = TRASH_ID.fullmatch(entry_id) and self._trashed(coll, entry_id)
        bytes_path = self.path(self.trash_parts(coll, entry_id))
        if not entry or not os.path.isfile(bytes_path):
            raise FileNotFoundError(entry_id)
        target = self.original_path(coll, entry.name)
        with FILE_LOCKS(target):
            if os.path.exists(target):
                raise FileExistsError(entry.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if entry.checksum:
                self._index(coll, entry.checksum.sha256, entry.name)
                self._catalogue(coll, entry.name, entry.checksum, None)
            os.rename(bytes_path, target)
            fsync_folder(os.path.dirname(target))
            os.remove(bytes_path + '.json')
            fsync_folder(os.path.dirname(bytes_path))
        return entry

    def purge(self, coll, entry_id):
        if not TRASH_ID.fullmatch(entry_id):
            raise FileNotFoundError(entry_id)
        path = self.path(self.trash_parts(coll, entry_id))
        remove_quietly(path)
        remove_quietly(path + '.json')

    # --- Checksums: the catalogue and the index ---------------------------------------------------------------

    def checksum(self, coll, name):
        if not os.path.isfile(self.original_path(coll, name)):
            raise FileNotFoundError(name)
        return self.recorded_checksum(self.original_parts(coll, name))

    def is_version(self, coll, name, identity):
        """Whether the original is still the version `identity` (called under its lock)."""
        try:
            return self.original_identity(coll, name) == identity
        except FileNotFoundError:
            return False

    def record_checksum(self, coll, name, checksum, identity):
        target = self.original_path(coll, name)
        with FILE_LOCKS(target):
            if not self.is_version(coll, name, identity):
                return False
            old = self.recorded_checksum(self.original_parts(coll, name))
            self._index(coll, checksum.sha256, name)
            self._catalogue(coll, name, checksum, None)
            if old and old.sha256 != checksum.sha256:
                self._unindex(coll, old.sha256, name)
        return True

    def recorded_checksum(self, parts):
        catalogue = self.catalogue_parts(parts)
        if catalogue is None:
            return None
        try:
            size = os.path.getsize(self.path(parts))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return self._entry_for_size(catalogue, size)

    def _entry_for_size(self, catalogue, size):
        """The catalogue's checksum for an original of this size: the entry's own, or the one it replaced (when a
        crash came between putting the entry and the original in place); None when neither is of that size."""
        text = self._entry_text(catalogue)
        for previous in (False, True):
            checksum = checksum_from_text(text, previous)
            if checksum and checksum.size == size:
                return checksum
        return None

    def _entry_text(self, catalogue):
        """A catalogue entry's text ('' when there is none)."""
        try:
            with open(self.path(catalogue), 'rb') as entry:
                return entry.read(CATALOGUE_ENTRY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return ''

    def _catalogue(self, coll, name, checksum, previous):
        """Put the original's catalogue entry in place durably, keeping the checksum of the version it replaces."""
        write_durably(self.path(self.catalogue_parts(self.original_parts(coll, name))),
                      checksum.as_text(previous).encode('utf-8'))

    def keep_checksum(self, parts, checksum):
        """Record the checksum of the original at `parts`, as copied from elsewhere (migrate.py)."""
        self._index_at(self.index_parts_of(parts, checksum.sha256))
        write_durably(self.path(self.catalogue_parts(parts)), checksum.as_text().encode('utf-8'))

    def _index(self, coll, sha256, name):
        self._index_at(self.index_parts(coll, sha256, name))

    def _index_at(self, parts):
        entry = self.path(parts)
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        with open(entry, 'ab'):
            pass
        fsync_folder(os.path.dirname(entry))

    def _unindex(self, coll, sha256, name):
        folder = self.path(self.index_parts(coll, sha256))
        remove_quietly(os.path.join(folder, name))
        with contextlib.suppress(OSError):       # another original of that SHA-256 still there: not empty
            os.rmdir(folder)

    def catalogued(self, coll):
        found = {}
        for entry, _info in self._listed(coll, CATALOGUE_DIR, follow=False):
            checksum = checksum_from_text(self._entry_text(self.catalogue_parts(self.original_parts(coll, entry.name))))
            if checksum:
                found[entry.name] = checksum.sha256
        return found

    def indexed(self, coll, sha256):
        try:
            return os.listdir(self.path(self.index_parts(coll, sha256)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _delete_derivatives(self, coll, name):
        folder = self.path([*self.folder_parts(coll), self.thumb_dir])
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            return
        owned = self.owns_derivative(coll, name)
        for entry in entries:
            if owned(entry):
                remove_quietly(os.path.join(folder, entry))

    def open(self, coll, name):
        """The original opened for reading (FileNotFoundError when there is none)."""
        return open(self.original_path(coll, name), 'rb')

    @contextlib.contextmanager
    def local_original(self, coll, name):
        """The original's path on this machine (FileNotFoundError when there is none)."""
        path = self.original_path(coll, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        yield path

    def original_identity(self, coll, name):
        """What names the original's current bytes (FileNotFoundError when there is none)."""
        return Identity(tuple(self.original_parts(coll, name)), file_identity(self.original_path(coll, name)))

    def found(self, parts, whole=False, seen=None):
        """The file at `parts`, with an original's checksum when one is recorded for its size (both read under the
        original's lock, so not of two versions)."""
        catalogue = self.catalogue_parts(parts)
        if catalogue is None:
            return self._found(parts, whole, seen)
        with FILE_LOCKS(self.path(parts)):
            found = self._found(parts, whole, seen)
            return found._replace(checksum=self._entry_for_size(catalogue, found.size))

    def _found(self, parts, whole=False, seen=None):
        """The file at `parts`, from SMALL_FILES while its inode, time and size (`seen`: its stat just taken) are
        those it was read with; a larger one opened and streamed from that open file even if replaced meanwhile."""
        path = self.path(parts)
        small = SMALL_FILES.get(path, seen)
        if small is None:
            try:
                handle = open(path, 'rb')
            except (IsADirectoryError, NotADirectoryError):
                raise FileNotFoundError(path) from None
            info = os.fstat(handle.fileno())
            if info.st_size > SMALL_FILES.largest:
                kind = kind_of(handle.read(1024))
                return Found(info.st_size, etag_of(info), info.st_mtime, kind,
                             lambda start, end: file_body(handle, start, end), handle.close)
            with handle:
                small = info, handle.read()
            SMALL_FILES.put(path, *small)
        info, data = small
        return Found(info.st_size, etag_of(info), info.st_mtime, kind_of(data[:1024]),
                     lambda start, end: data[start:end], lambda: None)

    def scratch_folder(self, coll, cache_name):
        """The derivative's own folder: putting it in place is then a rename on one file system, and a full disk
        there is the disk the conversion reports (507)."""
        return os.path.dirname(self.path(self.derivative_parts(coll, cache_name)))

    def local_path(self, parts):
        return self.path(parts)

    def derivative_is_fresh(self, coll, name, cache_name, identity=None):
        """A cached derivative counts when it is not older than its original (whose `identity` may be known):
        its stat then, else False."""
        try:
            derivative = os.stat(self.path(self.derivative_parts(coll, cache_name)))
            original = identity.version[1] if identity else os.stat(self.original_path(coll, name)).st_mtime_ns
            return derivative if derivative.st_mtime_ns >= original else False
        except FileNotFoundError:
            return False

    def store_derivative(self, coll, name, cache_name, made, identity):
        """Rename a made derivative into place, unless the original is no longer `identity` (then False)."""
        original = self.original_path(coll, name)
        with FILE_LOCKS(original):
            if not self.is_version(coll, name, identity):
                return False
            target = self.path(self.derivative_parts(coll, cache_name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(made, target)
        return True

    @contextlib.contextmanager
    def local_derivative(self, coll, cache_name):
        """The derivative's path on this machine (FileNotFoundError when there is none)."""
        path = self.path(self.derivative_parts(coll, cache_name))
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        yield path

    def health(self):
        return 'ok' if os.path.isdir(self.base) and os.access(self.base, os.W_OK | os.X_OK) else 'not writable'

    def sweep_temporaries(self, older_than=3600):
        """Remove temporaries left by a crash (not touched for an hour) in every folder of ours."""
        folders = [self.base] + [os.path.join(self.base, f) for f in (self.collections or {}).values()]
        cutoff = time.time() - older_than
        for folder in folders:
            for sub in (folder, *(os.path.join(folder, f) for f in (self.orig_dir, self.thumb_dir, *RECORD_FOLDERS))):
                sweep_folder(sub, cutoff)

    # --- Listing ------------------------------------------------------------------------------------------------

    def originals_modified(self, coll):
        """(name, modification time in epoch seconds) of each original, the time thumbnails are judged fresh by."""
        for entry, info in self._listed(coll, self.orig_dir, follow=True):
            yield entry.name, info.st_mtime

    def originals_bytes(self, coll):
        return sum(info.st_size for _entry, info in self._listed(coll, self.orig_dir, follow=True))

    def derivatives(self, coll):
        """(cache name, size, modification time) of each cached derivative: never a temporary, a link or anything
        else in the folder."""
        for entry, info in self._listed(coll, self.thumb_dir, follow=False):
            if derivative_source(entry.name) is not None:
                yield entry.name, info.st_size, info.st_mtime

    def remove_derivative(self, coll, cache_name):
        if name_problem(cache_name) or derivative_source(cache_name) is None:
            raise ValueError(f'not a derivative cache name: {cache_name!r}')
        remove_quietly(self.path(self.derivative_parts(coll, cache_name)))

    def stored_size(self, parts):
        return os.path.getsize(self.path(parts))

    def _listed(self, coll, folder, follow):
        """(entry, stat) of the regular files (through a link when `follow`) of one of the collection's
        folders, read once; a file gone meanwhile is left out."""
        try:
            entries = os.scandir(self.path([*self.folder_parts(coll), folder]))
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                try:
                    if not name_problem(entry.name) and entry.is_file(follow_symlinks=follow):
                        yield entry, entry.stat(follow_symlinks=follow)
                except FileNotFoundError:
                    continue


def etag_of(info):
    return f'"{info.st_size:x}-{info.st_mtime_ns:x}"'


class SmallFiles:
    """The bytes of recently served small files (thumbnails, tiles), at most `most` bytes, each at most `largest`:
    answered after one stat that finds the file as it was read (inode, time, size), the least recently used
    dropped first."""

    def __init__(self, most, largest):
        self.largest, self.lock = largest, threading.Lock()
        self.files = cachetools.LRUCache(most, getsizeof=lambda kept: len(kept[1]))

    @property
    def held(self):
        return self.files.currsize

    def get(self, path, seen=None):
        """(stat, bytes) of the file at `path` if kept and unchanged (as `seen`, a stat just taken, or one taken now),
        else None."""
        with self.lock:
            kept = self.files.get(path)
        if kept is None:
            return None
        try:
            now = seen if isinstance(seen, os.stat_result) else os.stat(path)
        except OSError:
            return None
        info, _data = kept
        if (now.st_ino, now.st_mtime_ns, now.st_size) != (info.st_ino, info.st_mtime_ns, info.st_size):
            return None
        return kept

    def put(self, path, info, data):
        with self.lock:
            self.files[path] = (info, data)


SMALL_FILES = SmallFiles(most=32 * 1024 ** 2, largest=256 * 1024)    # 32 MiB of answers of up to 256 KiB


def file_body(handle, start, end):
    """Bytes start..end of an open file: read at once when small, else streamed (closing the file)."""
    handle.seek(start)
    if end - start <= CHUNK:
        return handle.read(end - start)
    return stream_file(handle, end - start)

