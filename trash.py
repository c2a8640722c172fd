"""The trash's policy: a deleted original is kept TRASH_DAYS days (0: deleted at once, as the old server did),
then purged in a thread of its own when the server starts and at most once every PURGE_EVERY seconds after,
each purge written to the audit log.
The storage keeps the entries (storages/base.py: trash, trashed, restore, purge)."""

import contextlib
import threading
import time
import types
import typing

from audit import AuditLog
from errors import StorageUnavailable, UnknownCollection
from storages.base import Coll, Storage, Trashed

PURGE_EVERY = 3600               # seconds between two background purges of the entries past retention


class Trash:
    """Deleting into the trash, and purging what is past retention."""

    def __init__(self, config: types.SimpleNamespace, storage: Storage, audit: AuditLog) -> None:
        self.days, self.storage, self.audit = config.TRASH_DAYS, storage, audit
        self._purged_at = time.time()      # the server purges as it starts (purge_in_background), then hourly
        self._lock = threading.Lock()

    def delete(self, coll: Coll, name: str) -> Trashed | bool:
        """Delete an original: into the trash (the entry), or at once when TRASH_DAYS is 0 (True); False when it
        is not there."""
        if not self.days:
            return self.storage.delete(coll, name)
        return self.storage.trash(coll, name) or False

    def expired(self, coll: Coll, now: float) -> typing.Iterator[Trashed]:
        """The collection's entries past retention."""
        return (entry for entry in self.storage.trashed(coll) if entry.deleted < now - self.days * 86400)

    def purge_expired(self, now: float | None = None) -> list[tuple[Coll, Trashed]]:
        """Purge every entry past retention, each written to the audit log: (collection, entry) of each."""
        now = time.time() if now is None else now
        purged = []
        for coll in self.storage.every_collection():
            for entry in list(self.expired(coll, now)):
                self.storage.purge(coll, entry.id)
                self.audit.record('purge', coll, entry.name, size=entry.size,
                                  sha256=entry.checksum and entry.checksum.sha256, trash=entry.id)
                purged.append((coll, entry))
        return purged

    def purge_in_background(self) -> None:
        """Purge what is past retention in a thread that ends when done (a storage error is logged by none: the
        next purge tries again)."""
        threading.Thread(target=self._purge_quietly, daemon=True, name='trash purge').start()

    def _purge_quietly(self) -> None:
        with contextlib.suppress(StorageUnavailable, UnknownCollection, OSError):
            self.purge_expired()

    def purge_due(self, now: float | None = None) -> bool:
        """True (once) when a purge is due: the last was PURGE_EVERY seconds ago (None: never)."""
        now = time.time() if now is None else now
        with self._lock:
            if self._purged_at is not None and now - self._purged_at < PURGE_EVERY:
                return False
            self._purged_at = now
            return True
