"""The metadata reader's child: `python -m engines.exif_child MEMORY TIMEOUT MAX_VALUE MAX_ANSWER`, started by
engines/metadata.py. It reads one file per job through its pipe (never the storage), runs exifread on it under
its own memory and CPU limits, and answers Specify 6's groups as JSON. It imports none of the server's app.

The pipe's framing, both ways: the server sends a job (the file's size); the child asks for reads (offset,
length) and gets each as a length and the bytes; it ends the job with DONE and its JSON, or TOO_LARGE.
"""

import io
import json
import logging
import os
import resource
import struct
import sys

import exifread

from files import SeekableReader

JOB, READ, LENGTH = struct.Struct('>Q'), struct.Struct('>QI'), struct.Struct('>I')   # the pipe's framing

READY, READ_REQUEST, DONE, TOO_LARGE = b'+', b'R', b'D', b'T'     # what the child says


def metadata_child():
    """A child's loop: one file per job, read through the pipe, until the server closes the pipe."""
    memory, timeout, max_value, max_answer = map(int, sys.argv[1:5])
    lower_limit(resource.RLIMIT_AS, memory)
    os.nice(10)                         # the server's own threads come first when CPUs are short
    channel = os.dup(1)
    os.dup2(2, 1)                       # nothing printed in here can reach the server as an answer
    exhausted = watch_exif_log()
    write_all(channel, READY)
    while True:
        job = read_exactly(0, JOB.size, at_start=True)
        if not job:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)     # a backstop should the server be gone:
        lower_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + timeout + 2)   # SIGXCPU ends it
        source = io.BufferedReader(ServedFile(JOB.unpack(job)[0], channel), 64 * 1024)
        exhausted.seen = False
        answer = child_answer(source, max_value, max_answer)
        write_all(channel, TOO_LARGE if exhausted.seen else answer)


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


def child_answer(source, max_value, max_answer):
    """DONE + the groups as JSON (values cut to max_value), or TOO_LARGE."""
    try:
        try:
            tags = exifread.process_file(source, details=False, extract_thumbnail=False)
        except MemoryError:
            raise
        except Exception:               # exifread raises many kinds of errors on odd files: no EXIF
            tags = {}
        text = json.dumps(exif_groups(tags, max_value)).encode()
    except MemoryError:
        return TOO_LARGE
    if len(text) > max_answer:
        return TOO_LARGE
    return DONE + LENGTH.pack(len(text)) + text


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
        write_all(self.channel, READ_REQUEST + READ.pack(position, size))
        length = LENGTH.unpack(read_exactly(0, LENGTH.size))[0]
        return read_exactly(0, length)


def read_exactly(descriptor, count, at_start=False):
    """`count` bytes from the server's pipe; b'' when it closed at the start of a job, else the child ends."""
    data = bytearray()
    while len(data) < count:
        chunk = os.read(descriptor, count - len(data))
        if not chunk:
            if at_start and not data:
                return b''
            os._exit(0)                 # the server is gone or gave up on this job
        data += chunk
    return bytes(data)


def write_all(descriptor, data):
    """All of `data` to the server's pipe; the child ends quietly when the server is gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(descriptor, view):]
    except BrokenPipeError:
        os._exit(0)


if __name__ == '__main__':
    metadata_child()
