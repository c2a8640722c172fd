"""Soak: a mixed Specify workload at concurrency 32 against `python server.py` on loopback.

    .venv/bin/python -m bench.soak --seconds 300    # the long run (make soak); CI runs 20 s

Each client thread uploads files (random bytes and PNGs), reads them back and checks their
SHA-256, asks for thumbnails, metadata and testkey, and deletes files (then expects 404). It
counts every answer that is not what the protocol promises. After a warm-up third the load
stops until the server has settled (no conversion running, no temporary file, descriptors steady
for a second) and its resident memory and open file descriptors are read; the same again after
the rest of the soak, so the two readings compare like with like. At the end it looks for
temporary files left behind. The run is bounded in time and targets only 127.0.0.1.
"""

import argparse
import concurrent.futures
import hashlib
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from harness.client import KEY, multipart_body
from harness.images import png_bytes
from harness.servers import RunningServer
from names import TEMP_PREFIX
from tokens import make_token

HERE = os.path.dirname(os.path.abspath(__file__))


def process_figures(pid):
    """(resident memory in bytes, open file descriptors) of a process."""
    with open(f'/proc/{pid}/status') as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS:'))
    return rss, len(os.listdir(f'/proc/{pid}/fd'))


class Client:
    """One Specify user: its own files, checked after every step."""

    def __init__(self, web, number, report):
        self.web, self.number, self.report = web, number, report
        self.files = {}            # name -> sha256 of what was sent
        self.random = random.Random(number)

    def token(self, name):
        return make_token(KEY, name)

    def request(self, *args):
        """One request as a well-behaved client makes it: a 503 with Retry-After is asked again (up to five
        times) after a pause of up to Retry-After seconds, and counted."""
        for _ in range(5):
            status, headers, body = self.web.request(*args)
            if status != 503 or 'Retry-After' not in headers:
                break
            with self.report['lock']:
                self.report['retried'] += 1
            time.sleep(self.random.uniform(0.5, 1) * int(headers['Retry-After']))
        return status, headers, body

    def record(self, what, ok):
        with self.report['lock']:
            self.report['requests'][what] += 1
            if not ok:
                self.report['errors'][what] += 1

    def step(self):
        choice = self.random.random()
        if choice < 0.2 or not self.files:
            self.upload()
        elif choice < 0.5:
            self.read()
        elif choice < 0.65:
            self.thumbnail()
        elif choice < 0.75:
            self.metadata()
        elif choice < 0.85:
            self.testkey()
        else:
            self.delete()

    def upload(self):
        name = f'c{self.number}-{self.random.getrandbits(48):x}' + self.random.choice(['.png', '.bin'])
        if name.endswith('.png'):
            data = png_bytes(self.random.randint(20, 400), self.random.randint(20, 400))
        else:
            data = os.urandom(self.random.randint(1, 1024 * 1024))
        content_type, body = multipart_body([('file', name, data), ('store', name), ('type', 'O'),
                                             ('coll', 'Soak'), ('token', self.token(name))])
        status, _, answer = self.request('POST', '/fileupload', body, {'Content-Type': content_type})
        ok = (status, answer) == (200, b'Ok.')
        if ok:
            self.files[name] = hashlib.sha256(data).hexdigest()
        self.record('upload', ok)

    def pick(self):
        return self.random.choice(sorted(self.files))

    def read(self):
        name = self.pick()
        status, _, body = self.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))
        self.record('read original', status == 200 and hashlib.sha256(body).hexdigest() == self.files[name])

    def thumbnail(self):
        name = self.pick()
        status, headers, body = self.request('GET', '/fileget?' + urlencode(
            {'filename': name, 'type': 'T', 'scale': self.random.choice([64, 123, 256])}))
        expected = 200 if name.endswith('.png') else 404
        self.record('read thumbnail', status == expected and (expected == 404 or body.startswith(b'\x89PNG')))

    def metadata(self):
        status, _, body = self.request('GET', '/getmetadata?' + urlencode({'filename': self.pick(), 'dt': 'json'}))
        self.record('metadata', (status, body) == (200, b'[]'))

    def testkey(self):
        random_text = str(self.random.randint(-10**6, 10**6))
        status, _, body = self.request('GET', '/testkey?' + urlencode({'random': random_text, 'token': self.token(random_text)}))
        self.record('testkey', (status, body) == (200, b'Ok.'))

    def delete(self):
        name = self.pick()
        status, _, body = self.request('POST', '/filedelete', urlencode({'filename': name, 'token': self.token(name)}),
                                           {'Content-Type': 'application/x-www-form-urlencoded'})
        gone = self.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))[0]
        self.record('delete', (status, body, gone) == (200, b'Ok.', 404))
        del self.files[name]


def conversions(pid):
    """Pids of a process's children that are conversions (its metadata readers stay, idle, between requests)."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stat:
                if int(stat.read().rsplit(b')', 1)[1].split()[1]) != pid:
                    continue
            with open(f'/proc/{entry}/cmdline', 'rb') as cmdline:
                if b'engines.exif_child' not in cmdline.read():
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def temporaries(folder):
    """The server's temporary files and folders (os.walk, unlike rglob, copes with folders vanishing)."""
    found = set()
    for top, dirs, files in os.walk(folder):
        found.update(os.path.join(top, name) for name in dirs + files if name.startswith(TEMP_PREFIX))
    return found


def settle(web, folder, patience=75):
    """Wait until the server is idle: no conversion running, no temporary left, descriptors steady for 1 s.

    Returns (settled, seconds taken, resident memory, open descriptors). The patience is more than
    the 60 s conversion time limit, so a background thumbnail still at work has time to end.
    """
    started = time.time()
    steady = []
    while time.time() < started + patience:
        busy = conversions(web.process.pid) or temporaries(folder)
        steady = [] if busy else steady + [process_figures(web.process.pid)[1]]
        if len(steady) >= 6 and len(set(steady[-6:])) == 1:
            rss, fds = process_figures(web.process.pid)
            return True, time.time() - started, rss, fds
        time.sleep(0.2)
    rss, fds = process_figures(web.process.pid)
    return False, time.time() - started, rss, fds


def load(web, clients, seconds, report, crashed):
    """Every client at work until `seconds` have passed; the server's figures sampled each second."""
    deadline = time.time() + seconds

    def work(client):
        while time.time() < deadline:
            try:
                client.step()
            except Exception as error:           # a dropped connection or a timeout is an error too
                with report['lock']:
                    crashed.append(repr(error))
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(work, client) for client in clients]
        while time.time() < deadline:
            report['samples'].append((time.time(), *process_figures(web.process.pid)))
            time.sleep(1)
        for future in futures:
            future.result(timeout=120)


def run(seconds, concurrency=32, folder=None):
    """Run the soak: a warm-up third, a settle, the rest, a settle; return its figures."""
    folder = Path(folder or tempfile.mkdtemp(prefix='wast-soak-'))
    web = RunningServer(folder / 'attachments', folder / 'server.log', ACCESS_LOG='false',
                        THREADS=str(concurrency + 8), THUMBNAIL_QUEUE=str(concurrency),   # every client may wait
                        MAX_REQUESTS_PER_CLIENT=str(2 * concurrency))    # its clients share one address
    report = {'lock': threading.Lock(), 'requests': {}, 'errors': {}, 'samples': [], 'retried': 0}
    for what in ('upload', 'read original', 'read thumbnail', 'metadata', 'testkey', 'delete'):
        report['requests'][what] = report['errors'][what] = 0
    clients, crashed = [Client(web, n, report) for n in range(concurrency)], []
    warm_up = max(5, seconds // 3)
    try:
        load(web, clients, warm_up, report, crashed)
        warm = settle(web, folder / 'attachments')
        load(web, clients, seconds - warm_up, report, crashed)
        end = settle(web, folder / 'attachments')
        left = sorted(temporaries(folder / 'attachments'))
        killed = web.output().count('thumbnail conversion killed after')
    finally:
        web.stop()
    rss_under_load = [rss for _, rss, _ in report['samples']]
    return {
        'seconds': seconds, 'concurrency': concurrency,
        'requests': sum(report['requests'].values()), 'by kind': dict(report['requests']),
        'errors': sum(report['errors'].values()) + len(crashed), 'exceptions': crashed[:5],
        'retried': report['retried'],
        'settled': warm[0] and end[0], 'seconds to settle': (warm[1], end[1]),
        'rss idle after warm-up': warm[2], 'rss idle at end': end[2],
        'rss peak under load': max(rss_under_load),
        'fds idle after warm-up': warm[3], 'fds idle at end': end[3],
        'leftover temporaries': left, 'conversions killed by the time limit': killed,
    }


def as_table(figures):
    growth = figures['rss idle at end'] / figures['rss idle after warm-up'] - 1
    return '\n'.join([
        f"Soak: {figures['seconds']} s at concurrency {figures['concurrency']} on loopback\n",
        '| figure | value |', '|---|---:|',
        f"| requests served | {figures['requests']} |",
        *[f'| - {kind} | {count} |' for kind, count in figures['by kind'].items()],
        f"| unexpected answers or errors | {figures['errors']} |",
        f"| 503 with Retry-After, asked again | {figures['retried']} |",
        f"| resident memory idle after warm-up / idle at end | {figures['rss idle after warm-up'] / 2**20:.1f} MB / "
        f"{figures['rss idle at end'] / 2**20:.1f} MB ({growth:+.1%}) |",
        f"| resident memory at its peak under load | {figures['rss peak under load'] / 2**20:.1f} MB |",
        f"| open file descriptors idle after warm-up / idle at end | {figures['fds idle after warm-up']} / "
        f"{figures['fds idle at end']} |",
        "| seconds to settle after warm-up / at end | %.1f / %.1f |" % figures['seconds to settle'],
        f"| temporary files left | {len(figures['leftover temporaries'])} |",
        f"| conversions killed by the time limit | {figures['conversions killed by the time limit']} |",
    ])


def main():
    parser = argparse.ArgumentParser(description='Soak the server with a mixed Specify workload.')
    parser.add_argument('--seconds', type=int, default=300)
    parser.add_argument('--concurrency', type=int, default=32)
    args = parser.parse_args()
    figures = run(args.seconds, args.concurrency)
    print(as_table(figures))
    if figures['exceptions']:
        print('\nfirst errors:', *figures['exceptions'], sep='\n')
    return 1 if figures['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
