"""The one framing the server and its engine children speak over pipes: each message is one line of JSON; a message
that says `"bytes": n` is followed by n raw bytes. The child's side reads and writes blocking; the server's side
(engines/children.py) waits for each message until a deadline.

Imports nothing but the standard library: the children import it before anything else of theirs.
"""

import json
import os
import sys

LONGEST_LINE = 64 * 1024         # a message's JSON line, at most (its bytes follow it apart)


def encoded(message: dict, data: bytes = b'') -> bytes:
    """A message as it goes over the pipe (with `data`, its bytes announced and appended)."""
    if data:
        message = dict(message, bytes=len(data))
    return json.dumps(message, separators=(',', ':')).encode() + b'\n' + bytes(data)


class ChildChannel:
    """The child's end: standard input and a copy of standard output, standard output itself then pointed at
    standard error, so that nothing a library prints can reach the server as a message."""

    def __init__(self) -> None:
        self.reader = sys.stdin.buffer
        self.writer = os.fdopen(os.dup(1), 'wb')
        os.dup2(2, 1)

    def send(self, message: dict, data: bytes = b'') -> None:
        try:
            self.writer.write(encoded(message, data))
            self.writer.flush()
        except BrokenPipeError:
            os._exit(0)                 # the server is gone or gave up on this job

    def receive(self) -> tuple[dict | None, bytes]:
        """(message, data) from the server; (None, b'') when it closed the pipe."""
        line = self.reader.readline(LONGEST_LINE + 1)
        if not line.endswith(b'\n'):
            return None, b''
        message = json.loads(line)
        data = self.reader.read(message.get('bytes', 0)) if message.get('bytes') else b''
        if len(data) != message.get('bytes', 0):
            return None, b''
        return message, data
