"""The metadata reader's child: `python -m engines.exif_child MEMORY TIMEOUT MAX_VALUE MAX_ANSWER`, kept by
engines/metadata.py's child pool. It reads one file per job through its pipe (never the storage), runs exifread on
it under its own memory and CPU limits, and answers Specify 6's groups as JSON. It imports none of the server's app.

In the framing of engines/framing.py: a job {"job": "exif", "args": [size]}; the child asks {"read": [offset,
length]} and gets the bytes; it answers {"ok": true} with the JSON as its bytes, or {"ok": false} when the file
needed more than MEMORY or its answer would be longer than MAX_ANSWER.
"""

import io
import json
import logging
import os
import resource
import sys

import exifread

from engines.framing import ChildChannel
from files import SeekableReader

TOO_LARGE = {'ok': False, 'error': 'too large'}


def metadata_child():
    """A child's loop: one file per job, read through the pipe, until the server closes the pipe."""
    memory, timeout, max_value, max_answer = map(int, sys.argv[1:5])
    lower_limit(resource.RLIMIT_AS, memory)
    os.nice(10)                         # the server's own threads come first when CPUs are short
    channel = ChildChannel()            # nothing printed in here can reach the server as a message
    exhausted = watch_exif_log()
    channel.send({'ready': True})
    while True:
        job, _data = channel.receive()
        if job is None:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)     # a backstop should the server be gone:
        lower_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + timeout + 2)   # SIGXCPU ends it
        source = io.BufferedReader(ServedFile(int(job['args'][0]), channel), 64 * 1024)
        exhausted.seen = False
        text = answer_text(source, max_value, max_answer)
        if exhausted.seen or text is None:
            channel.send(TOO_LARGE)
        else:
            channel.send({'ok': True}, text)


def lower_limit(kind, soft):
    """Set a soft resource limit, never above the hard one the deployment may have set."""
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def watch_exif_log():
    """A handler on exifread's log that notes when it ran out of memory; its warnings go nowhere else."""
    exhausted = MemoryExhausted()
    exif_log = logging.getLogger('exifread')
    exif_log.setLevel(logging.WARNING)
    exif_log.propagate = False
    exif_log.addHandler(exhausted)
    return exhausted


class MemoryExhausted(logging.Handler):
    """Notes exifread's own report of a MemoryError it caught (it then shows that tag as empty)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record):
        self.seen = self.seen or str(record.msg).startswith('MemoryError')


def answer_text(source, max_value, max_answer):
    """The groups as JSON bytes (values cut to max_value), or None when they need too much memory or room."""
    try:
        try:
            tags = exifread.process_file(source, details=False, extract_thumbnail=False)
        except MemoryError:
            raise
        except Exception:               # exifread raises many kinds of errors on odd files: no EXIF
            tags = {}
        text = json.dumps(exif_groups(tags, max_value)).encode()
    except MemoryError:
        return None
    return text if len(text) <= max_answer else None


def exif_groups(tags, max_value):
    """Specify 6's shape: [{"Name": group, "Fields": {tag: text}}], one entry per EXIF group."""
    groups = {}
    for key, value in tags.items():
        if hasattr(value, 'printable') and ' ' in key:
            group, tag = key.split(' ', 1)
            text = str(value.printable)
            groups.setdefault(group, {})[tag] = text if len(text) <= max_value else text[:max_value - 1] + '\u2026'
    return [{'Name': group, 'Fields': fields} for group, fields in groups.items()]


class ServedFile(SeekableReader):
    """The file as the server serves it over the pipe: read-only and seekable."""

    def __init__(self, size, channel):
        super().__init__(size)
        self.channel = channel

    def fetch(self, position, size):
        self.channel.send({'read': [position, size]})
        answer, data = self.channel.receive()
        if answer is None:
            os._exit(0)                 # the server is gone or gave up on this job
        return data


if __name__ == '__main__':
    metadata_child()
