"""The storage interface: the upstream layout every storage shares, and the primitives each one implements.

Paths and keys are [<collection folder>/]<originals|thumbnails>/<name>, the collection folder only when
COLLECTION_DIRS maps collections to folders; the thumbnails folder holds every derivative (thumbnails,
pyramids, IIIF answers). Each original's checksum is kept with it: on disk in a catalogue beside the originals
(.checksums/<name>), on S3 in the object's own metadata; .sha256/<hex>/<name> lists the originals of a SHA-256.
A storage knows nothing of HTTP: the app answers from what `found` describes.
"""

import json
import os
import re
import secrets
import time
import types
import typing

from checksums import Checksum, checksum_from_fields
from errors import UnknownCollection
from files import sweep_folder
from names import CATALOGUE_DIR, INDEX_DIR, TRASH_DIR, Identity, is_derivative_of, name_problem


Coll = str | None                # a COLLECTION_DIRS key, or None without COLLECTION_DIRS
Parts = typing.Sequence[str]     # a stored file's path below BASE_DIR (or S3_PREFIX), one name per folder


class Found(typing.NamedTuple):
    """One version of a stored file, as an answer needs it: `body(start, end)` gives its bytes start..end (bytes,
    or an iterable that streams them), `close()` releases what `body` was not asked for."""
    size: int
    etag: str
    modified: float              # epoch seconds
    content_type: str | None     # as stored, or as its first bytes show; None: unknown
    body: typing.Callable
    close: typing.Callable
    checksum: Checksum | None = None     # an original's, as recorded for this version; None: none recorded



class Trashed(typing.NamedTuple):
    """A deleted original kept in the trash: its entry's id (sorting by time of deletion), its name, when it was
    deleted (epoch seconds), its size, and the checksum recorded for it."""
    id: str
    name: str
    deleted: float
    size: int
    checksum: Checksum | None

    def as_text(self) -> str:
        return json.dumps({'name': self.name, 'deleted': self.deleted, 'size': self.size,
                           'checksum': self.checksum._asdict() if self.checksum else None})


TRASH_ID = re.compile(r'[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}')


def new_trash_id(now: float) -> str:
    """A trash entry's id: the time of deletion, then random digits (two deletes in one second differ)."""
    return time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now)) + '-' + secrets.token_hex(6)


def trashed_from_text(entry_id: str, text: str | bytes) -> Trashed | None:
    """The trash entry a record holds, or None when it is not one."""
    try:
        fields = json.loads(text)
        name, deleted, size = str(fields['name']), float(fields['deleted']), int(fields['size'])
        checksum = fields['checksum'] and checksum_from_fields(fields['checksum'])
    except (ValueError, TypeError, KeyError):
        return None
    return None if name_problem(name) else Trashed(entry_id, name, deleted, size, checksum or None)


class Storage:
    """The layout, and the primitives a storage implements (each raises FileNotFoundError for a missing file,
    StorageUnavailable when the store fails)."""

    def __init__(self, config: types.SimpleNamespace) -> None:
        self.collections = config.COLLECTION_DIRS
        self.orig_dir, self.thumb_dir = config.ORIG_DIR, config.THUMB_DIR
        self.staging = config.BASE_DIR

    # --- The layout ---------------------------------------------------------------------------------------------

    def folder_parts(self, coll: Coll) -> list[str]:
        """The collection's folder as path parts; UnknownCollection for one COLLECTION_DIRS does not name."""
        if self.collections is None:
            return []
        if coll not in self.collections:
            raise UnknownCollection('Unknown collection.')
        return [self.collections[coll]]

    def original_parts(self, coll: Coll, name: str) -> list[str]:
        return [*self.folder_parts(coll), self.orig_dir, name]

    def catalogue_parts(self, parts: Parts) -> list[str] | None:
        """Where the checksum of the original at `parts` is catalogued; None when `parts` is not an original's."""
        if len(parts) < 2 or parts[-2] != self.orig_dir:
            return None
        return [*parts[:-2], CATALOGUE_DIR, parts[-1]]

    def trash_parts(self, coll: Coll, name: str = '') -> list[str]:
        """A file of the collection's trash (name '': the trash folder)."""
        return [*self.folder_parts(coll), TRASH_DIR, *([name] if name else [])]

    def index_parts_of(self, parts: Parts, sha256: str) -> list[str]:
        """The index entry of the original at `parts` for this SHA-256."""
        return [*parts[:-2], INDEX_DIR, sha256, parts[-1]]

    def index_parts(self, coll: Coll, sha256: str, name: str = '') -> list[str]:
        """The index entry saying that `name` has this SHA-256 (name '': the folder of all that have it)."""
        return [*self.folder_parts(coll), INDEX_DIR, sha256, *([name] if name else [])]

    def derivative_parts(self, coll: Coll, cache_name: str) -> list[str]:
        """Where a cached derivative (a thumbnail, a pyramid, an IIIF answer) of the collection is kept."""
        return [*self.folder_parts(coll), self.thumb_dir, cache_name]

    def owns_derivative(self, coll: Coll, name: str) -> typing.Callable[[str], bool]:
        """A test for the cache names of `name`'s derivatives, and for a PDF also the <root>_<scale>.png that
        older servers made, unless a PNG original of that name owns them."""
        root, ext = os.path.splitext(name)
        owners = [name]
        if ext.lower() == '.pdf' and not self.exists(coll, root + '.png'):
            owners.append(root + '.png')
        return lambda candidate: any(is_derivative_of(candidate, owner) for owner in owners)

    def is_static_parts(self, parts: Parts) -> bool:
        """True when a /static/ path names a file in an originals or thumbnails folder."""
        if any(name_problem(part) for part in parts):
            return False
        if self.collections is not None:
            if not parts or parts[0] not in self.collections.values():
                return False
            parts = parts[1:]
        return len(parts) == 2 and parts[0] in (self.orig_dir, self.thumb_dir)

    def every_collection(self) -> list[Coll]:
        """One collection name per collection folder (None: the one folder)."""
        return list({folder: coll for coll, folder in (self.collections or {None: None}).items()}.values())

    def staging_folder(self) -> str:
        """A local folder for uploads in progress and local copies of stored files."""
        return self.staging

    def scratch_folder(self, coll: Coll, cache_name: str) -> str:
        """Where a derivative is made before store_derivative puts it in place: on a store, the staging folder."""
        return self.staging_folder()

    def sweep_temporaries(self, older_than: float = 3600) -> None:
        """Remove temporaries left by a crash (not touched for an hour) in the staging folder."""
        sweep_folder(self.staging, time.time() - older_than)

    # --- Originals ----------------------------------------------------------------------------------------------

    def exists(self, coll: Coll, name: str) -> bool:
        raise NotImplementedError

    def save(self, coll: Coll, name: str, staged: str, checksum: Checksum) -> bool:
        """Put a complete staged file in place as the original with its checksum, both atomically and durably;
        then remove the old bytes' derivatives. True when it replaced an original."""
        raise NotImplementedError

    def delete(self, coll: Coll, name: str) -> bool:
        """Remove an original and exactly its own derivatives; False when it is not there."""
        raise NotImplementedError

    def open(self, coll: Coll, name: str) -> typing.BinaryIO:
        """The original as a seekable file opened for reading."""
        raise NotImplementedError

    def local_original(self, coll: Coll, name: str) -> typing.ContextManager[str]:
        """The original's path on this machine while held (a copy where the store is remote)."""
        raise NotImplementedError

    def original_identity(self, coll: Coll, name: str) -> Identity:
        raise NotImplementedError

    # --- The trash: deleted originals kept for TRASH_DAYS --------------------------------------------------------

    def trash(self, coll: Coll, name: str) -> Trashed | None:
        """Move an original, with what is recorded of it, into the trash; drop its derivatives and its checksum's
        records. None when it is not there."""
        raise NotImplementedError

    def trashed(self, coll: Coll) -> typing.Iterator[Trashed]:
        """The entries of the collection's trash, oldest first."""
        raise NotImplementedError

    def restore(self, coll: Coll, entry_id: str) -> Trashed:
        """Put a trashed original back under its name, with its checksum; FileExistsError when that name is stored
        again, FileNotFoundError when there is no such entry."""
        raise NotImplementedError

    def purge(self, coll: Coll, entry_id: str) -> None:
        """Remove a trash entry for good."""
        raise NotImplementedError

    # --- Checksums ------------------------------------------------------------------------------------------------

    def checksum(self, coll: Coll, name: str) -> Checksum | None:
        """The checksum recorded for the original's current version (None: none recorded; FileNotFoundError when
        there is no original)."""
        raise NotImplementedError

    def record_checksum(self, coll: Coll, name: str, checksum: Checksum, identity: Identity) -> bool:
        """Record a checksum taken of the stored original, unless it is no longer the version `identity` (False)."""
        raise NotImplementedError

    def recorded_checksum(self, parts: Parts) -> Checksum | None:
        """The checksum recorded for the current version of the original at `parts`; None when none is, or `parts`
        is not an original's."""
        return None

    def names_with_sha256(self, coll: Coll, sha256: str) -> list[str]:
        """The names of the collection's originals whose recorded SHA-256 is `sha256` (lowercase hex), sorted."""
        found = []
        for name in self.indexed(coll, sha256):
            try:
                checksum = self.checksum(coll, name)
            except FileNotFoundError:
                checksum = None
            if checksum and checksum.sha256 == sha256:
                found.append(name)
        return sorted(found)

    def catalogued(self, coll: Coll) -> dict[str, str]:
        """{name: SHA-256} of every name the collection's records hold a checksum for, whatever version it
        describes (disk: the catalogue; S3: the index, which outlives an object replaced without the server)."""
        raise NotImplementedError

    def indexed(self, coll: Coll, sha256: str) -> typing.Iterator[str]:
        """The names the SHA-256 index lists for `sha256`: some may be stale (replaced or deleted since)."""
        raise NotImplementedError

    # --- Any stored file, by its path parts -----------------------------------------------------------------------

    def found(self, parts: Parts, whole: bool = False, seen: object = None) -> Found:
        """One version of the file at `parts` to answer from. `whole`: the answer is all of it (a store may fetch
        it at once); `seen`: what derivative_is_fresh returned for it just now."""
        raise NotImplementedError

    def local_path(self, parts: Parts) -> str | None:
        """The file's path on this machine, for a web server in front to send (FILE_OFFLOAD); None: none."""
        return None

    # --- Derivatives ----------------------------------------------------------------------------------------------

    def derivative_is_fresh(self, coll: Coll, name: str, cache_name: str, identity: Identity | None = None) -> object:
        """Something true (handed to `found` as `seen`) when the derivative is stored and was made from the
        original's current bytes (`identity`, when known), else False."""
        raise NotImplementedError

    def store_derivative(self, coll: Coll, name: str, cache_name: str, made: str, identity: Identity) -> bool:
        """Put a made derivative in place, unless the original is no longer `identity` (then False)."""
        raise NotImplementedError

    def local_derivative(self, coll: Coll, cache_name: str) -> typing.ContextManager[str]:
        """The derivative's path on this machine while held."""
        raise NotImplementedError

    def remove_derivative(self, coll: Coll, cache_name: str) -> None:
        """Remove one cached derivative; ValueError for a name that is not a derivative's."""
        raise NotImplementedError

    # --- Listing: what derivatives.py walks and the cache bound weighs -------------------------------------------

    def originals(self, coll: Coll) -> typing.Iterator[str]:
        """The names of the collection's originals (coll: a COLLECTION_DIRS key, or None without them)."""
        return (name for name, _modified in self.originals_modified(coll))

    def originals_modified(self, coll: Coll) -> typing.Iterator[tuple[str, float]]:
        """(name, modification time in epoch seconds) of each original."""
        raise NotImplementedError

    def originals_bytes(self, coll: Coll) -> int:
        """The bytes the collection's originals hold."""
        raise NotImplementedError

    def derivatives(self, coll: Coll) -> typing.Iterator[tuple[str, int, float]]:
        """(cache name, size in bytes, modification time in epoch seconds) of each cached derivative: only names
        that parse as derivatives' names."""
        raise NotImplementedError

    def stored_size(self, parts: Parts) -> int:
        raise NotImplementedError

    def health(self) -> str:
        """'ok', or what is wrong in a word or two."""
        raise NotImplementedError
