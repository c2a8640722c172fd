"""What the benchmarks share: made inputs, timing, peak memory of process trees, wrk, a bare Paste app.

Not a benchmark itself; the benchmarks import it and the harness (harness/) that the tests use too. They
run as modules from the project's folder (`python -m bench.previews`, as the Makefile does).
"""

import os
import re
import subprocess
import sys
import threading
import time

from harness.client import multipart_body
from harness.processes import free_port, holds_listener, parent_pids, started
from engines.imagemagick import find_imagemagick
from tokens import make_token

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
OUT = os.path.join(HERE, 'out')

CONVERT = find_imagemagick(None)     # the real ImageMagick, not a fake one earlier on PATH

BARE_APP = '''
import sys
from paste import httpserver
BODY = b'x' * int(sys.argv[2])
def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'image/jpeg'), ('Content-Length', str(len(BODY)))])
    return [BODY]
httpserver.serve(app, host='127.0.0.1', port=sys.argv[1], use_threadpool=True, threadpool_workers=20)
'''


def make(name, *command):
    """Make one input file with the given command ('{out}' names it) unless bench/out already has it."""
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        os.makedirs(OUT, exist_ok=True)
        root, ext = os.path.splitext(path)
        partial = root + '.partial' + ext      # the kind some tools tell from the name is kept
        subprocess.run([arg.replace('{out}', partial) for arg in command], check=True, capture_output=True)
        os.replace(partial, path)       # an interrupted run leaves no half-made input to be reused
    return path


def timed(action):
    """Seconds `action()` took."""
    started_at = time.perf_counter()
    action()
    return time.perf_counter() - started_at


def tree_rss(roots):
    """Resident memory in bytes of some processes and all their descendants (from /proc)."""
    parents = parent_pids()
    pids, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        kids = [child for child, of in parents.items() if of == parent and child not in pids]
        pids.update(kids)
        frontier += kids
    total = 0
    for pid in pids:
        try:
            with open(f'/proc/{pid}/statm') as f:
                total += int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
        except OSError:
            pass
    return total


class InBackground:
    """A `with` block during which a thread runs self.run(), which loops while self.running."""

    def __init__(self):
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


class PeakMemory(InBackground):
    """Samples the resident memory of some processes' trees every 20 ms while in use. `pids` is a set the
    caller may change meanwhile (processes started and ended one after another)."""

    def __init__(self, *pids):
        super().__init__()
        self.pids, self.peak = set(pids), 0

    def run(self):
        while self.running:
            self.peak = max(self.peak, tree_rss(list(self.pids)))
            time.sleep(0.02)


def upload(web, key, name, data):
    """Store `data` as original `name` through the server's /fileupload."""
    content_type, body = multipart_body([('store', name), ('type', 'O'), ('token', make_token(key, name)),
                                         ('file', name, data)])
    status, _headers, answer = web.request('POST', '/fileupload', body, {'Content-Type': content_type}, timeout=300)
    assert answer == b'Ok.', (status, answer[:200])


def wrk(url, seconds, timeout=None):
    """(requests per second, problems) wrk measures for `url`; problems name any answer not 2xx."""
    rate, _answered, problems = wrk_rates(url, seconds, timeout)
    return rate, problems


def wrk_rates(url, seconds, timeout=None):
    """(requests per second, those of them answered below 400, problems) wrk measures for `url`; problems
    name any answer not 2xx. `timeout`: seconds wrk waits for an answer before it counts a socket error
    (its own default is 2)."""
    first = subprocess.run(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', url],
                           capture_output=True, text=True, timeout=60).stdout
    patience = [f'--timeout={timeout}s'] if timeout else []
    out = subprocess.run(['wrk', '-t2', '-c16', f'-d{seconds}s', *patience, url], capture_output=True, text=True,
                         timeout=seconds + (timeout or 0) + 60).stdout
    problems = [] if first == '200' else [f'a single request answered {first or "nothing"}']
    rejected = re.search(r'Non-2xx or 3xx responses:\s*(\d+)', out)      # wrk counts answers of 400 and above
    if rejected:
        problems.append(f'{rejected.group(1)} answers of 400 or above')
    broken = re.search(r'Socket errors:.*', out)
    if broken:
        problems.append(broken.group(0))
    rate = float(re.search(r'Requests/sec:\s*([0-9.]+)', out).group(1))
    total = int(re.search(r'(\d+) requests in', out).group(1))
    answered = rate * (total - int(rejected.group(1))) / total if rejected else rate
    return rate, answered, problems


def bare_paste_app(size=3):
    """The baseline: a WSGI app under Paste answering `size` constant bytes, on a free loopback port
    (retried if taken). Returns (process, port)."""
    def launch():
        launch.port = free_port()
        process = subprocess.Popen([sys.executable, '-c', BARE_APP, str(launch.port), str(size)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return process, lambda: process.stderr.read().decode('utf-8', 'replace') if process.poll() is not None else ''
    process = started(launch, lambda p: holds_listener(p.pid, launch.port), 20)
    return process, launch.port
