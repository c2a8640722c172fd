"""The audit log: one JSON line per change to the originals (upload, replace, delete, and the preservation
commands' restore, purge and quarantine), with when, which collection and name, the size and SHA-256, the client
and the outcome. Each line is appended and synced before the change is answered, to a file opened anew for every
line, so a log rotation that moves the file away loses nothing. It never holds the key or a token."""

import json
import os
import threading
import time


class AuditLog:
    """Appends one line per change to the file at `path` (made with its folder as needed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, action: str, coll: str | None, name: str, outcome: str = 'ok', size: int | None = None,
               sha256: str | None = None, client: str | None = None, **more: object) -> None:
        """Append the line of one change, durably."""
        line = json.dumps({'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'action': action,
                           'collection': coll, 'name': name, 'size': size, 'sha256': sha256,
                           'client': client, 'outcome': outcome, **more}) + '\n'      # names exactly, as ASCII
        with self._lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(descriptor, line.encode('ascii'))
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
