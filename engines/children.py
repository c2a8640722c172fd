"""Child processes that stay for the next job, spoken to in JSON lines: one line per job on standard input,
one answer line per job on standard output. Starting a child costs an interpreter and its libraries (50 ms for
libvips); keeping a few costs nothing while idle."""

import json
import logging
import os
import select
import signal
import subprocess
import threading
import time

from config import HERE
from errors import PassingFailure, ThumbnailError
from names import printable

log = logging.getLogger('web_asset_server')


class ChildPool:
    """Children running `command`, at most `workers` kept idle. Each runs under `limit_child` in `environment`;
    one that overruns its deadline is killed, one that fails or ends is not used again, and each is replaced
    after `jobs_per_child` jobs."""
    jobs_per_child = 200

    def __init__(self, command, workers, environment, limit_child, timeout):
        self.command, self.workers, self.environment, self.limit_child = command, workers, environment, limit_child
        self.timeout = timeout          # only for the log: the caller sets each job's deadline
        self.idle, self.lock = [], threading.Lock()

    def run(self, job, args, scratch, deadline):
        """What the job printed; ThumbnailError when it fails, ends or overruns the deadline."""
        child = self._child()
        try:
            os.write(child.stdin.fileno(), json.dumps({'job': job, 'args': args, 'folder': scratch}).encode() + b'\n')
            answer = json.loads(read_line(child.stdout.fileno(), deadline))
        except TimeoutError:
            self._end(child)
            log.warning('IIIF %s killed after %s s (THUMBNAIL_TIMEOUT)', job, self.timeout)
            raise ThumbnailError('Making the image took too long.') from None
        except (OSError, ValueError):
            self._end(child)
            failure = PassingFailure if child.returncode == -signal.SIGKILL else ThumbnailError   # the OOM killer
            raise failure('This file could not be viewed.') from None
        child.jobs += 1
        with self.lock:
            if answer.get('ok') and child.jobs < self.jobs_per_child and len(self.idle) < self.workers:
                self.idle.append(child)
                child = None
        if child is not None:
            self._end(child)
        if not answer.get('ok'):
            log.info('IIIF %s failed: %s', job, printable(str(answer.get('error', '')))[:500])
            raise ThumbnailError('This file could not be viewed.')
        return answer.get('printed', '')

    def _child(self):
        """An idle child still alive, or a new one (libvips is loaded by its first job)."""
        with self.lock:
            while self.idle:
                child = self.idle.pop()
                if child.poll() is None:
                    return child
        try:
            child = subprocess.Popen(self.command, cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.environment,
                                     preexec_fn=self.limit_child, bufsize=0)
        except OSError as error:
            log.warning('could not start the IIIF engine: %s', error)
            raise PassingFailure('This file could not be viewed.') from None
        os.set_blocking(child.stdout.fileno(), False)
        child.jobs = 0
        return child

    @staticmethod
    def _end(child):
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def read_line(descriptor, deadline):
    """One line from a non-blocking pipe before the deadline (TimeoutError; OSError when it closes first)."""
    data = bytearray()
    while not data.endswith(b'\n'):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([descriptor], [], [], left)[0]:
            raise TimeoutError()
        try:
            chunk = os.read(descriptor, 64 * 1024)
        except BlockingIOError:
            continue
        if not chunk:
            raise OSError('the engine ended without an answer')
        data += chunk
    return bytes(data)
