"""Preservation benchmark: what checksums cost an upload, and how fast `preservation.py verify` reads.

Run with `.venv/bin/python -m bench.preservation [--baseline REV]` (after `make test` has set things up).

1. Uploads with checksums against without: the same 2 MiB uploads (POST /fileupload, 4 clients at once, on disk)
   through `python server.py` of this checkout and of REV (default: the commit before checksums), taking turns,
   five rounds each; the median throughput of each and their ratio (goal: at most 5% slower).
2. verify against sha256sum: the same originals (200 of 1 MiB and 4 of 64 MiB, 456 MiB in all, in the page
   cache) checked by `python preservation.py verify` and by `sha256sum`, three times each, taking turns; the
   median time of each and the speed ratio (goal: at least 0.8).
3. verify's memory: the peak resident memory of one verify of a 1 GiB original.
"""

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from checksums import Hashing
from config import load_config
from harness.client import KEY, multipart_body
from harness.processes import PROJECT
from harness.servers import RunningServer
from storages import make_storage
from tokens import make_token

BASELINE = 'aabe013'             # main before checksums from ingest (replaced by --baseline)
UPLOADS, UPLOAD_SIZE, CLIENTS, ROUNDS = 48, 2 * 2**20, 4, 5


def upload_round(web, payload, round_number):
    """MB/s of UPLOADS uploads of payload, CLIENTS at a time."""
    def one(i):
        name = f'r{round_number}-{i}.bin'
        content_type, body = multipart_body([('file', name, payload), ('store', name), ('type', 'O'),
                                             ('token', make_token(KEY, name))])
        status, _, answer = web.request('POST', '/fileupload', body, {'Content-Type': content_type,
                                                                       'Content-Length': str(len(body))})
        assert (status, answer) == (200, b'Ok.'), (status, answer)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(UPLOADS)))
    return UPLOADS * len(payload) / 1e6 / (time.perf_counter() - started)


def uploads(scratch, baseline):
    """The median upload throughput of this checkout and of the baseline's, rounds taken in turn."""
    old = os.path.join(scratch, 'baseline')
    subprocess.run(['git', 'worktree', 'add', '--detach', old, baseline], cwd=PROJECT, check=True, capture_output=True)
    try:
        servers = {'with checksums': RunningServer(os.path.join(scratch, 'new'), os.path.join(scratch, 'new.log'),
                                                   ACCESS_LOG='false', PREGENERATE_SCALE='none', KEY=KEY),
                   'without (baseline)': RunningServer(os.path.join(scratch, 'old'), os.path.join(scratch, 'old.log'),
                                                       cwd=old, ACCESS_LOG='false', PREGENERATE_SCALE='none', KEY=KEY)}
        payload, rates = os.urandom(UPLOAD_SIZE), {name: [] for name in servers}
        try:
            for number in range(ROUNDS):
                for name, web in servers.items():
                    rates[name].append(upload_round(web, payload, number))
        finally:
            for web in servers.values():
                web.stop()
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', old], cwd=PROJECT, capture_output=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def stored_originals(base, sizes):
    """Originals stored as uploads store them (with checksums), straight through the storage."""
    storage = make_storage(load_config({'BASE_DIR': base, 'KEY': KEY}, environ={}))
    os.makedirs(base, exist_ok=True)
    for number, size in enumerate(sizes):
        staged, hashing = os.path.join(base, f'staged-{number}'), Hashing()
        with open(staged, 'wb') as f:
            for _ in range(size // 2**20):
                block = os.urandom(2**20)
                f.write(block)
                hashing.update(block)
        storage.save(None, f'{number:04d}.bin', staged, hashing.checksum())
    return os.path.join(base, 'originals')


def timed(command, environ=None):
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environ, cwd=PROJECT)
    return time.perf_counter() - started


def verify_speed(scratch):
    """Median seconds of verify and of sha256sum over the same originals, warm in the page cache."""
    base = os.path.join(scratch, 'verify')
    folder = stored_originals(base, [2**20] * 200 + [64 * 2**20] * 4)
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    environ = {**os.environ, 'BASE_DIR': base, 'KEY': KEY}
    verify = [sys.executable, 'preservation.py', 'verify', '--nice', '0', '--restart']
    timed(['cat', *files])
    times = {'preservation.py verify': [], 'sha256sum': []}
    for _ in range(3):
        times['preservation.py verify'].append(timed(verify, environ))
        times['sha256sum'].append(timed(['sha256sum', *files]))
    return {name: statistics.median(values) for name, values in times.items()}, sum(map(os.path.getsize, files))


def verify_memory(scratch):
    """Peak resident memory (MiB) of a verify of one 1 GiB original: its VmHWM, read every 10 ms while it runs
    (wait4's figure would count this process's memory at the fork)."""
    base = os.path.join(scratch, 'large')
    stored_originals(base, [2**30])
    process = subprocess.Popen([sys.executable, 'preservation.py', 'verify', '--nice', '0'], cwd=PROJECT,
                               env={**os.environ, 'BASE_DIR': base, 'KEY': KEY}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        try:
            with open(f'/proc/{process.pid}/status') as status:
                peak = max([peak] + [int(line.split()[1]) for line in status if line.startswith('VmHWM:')])
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert process.returncode == 0, process.returncode
    return peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--baseline', default=BASELINE, help='the revision without checksums')
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix='bench-preservation-')
    try:
        rates = uploads(scratch, args.baseline)
        print('| uploads (2 MiB, 4 clients, disk) | median MB/s |\n|---|---:|')
        for name, rate in rates.items():
            print(f'| {name} | {rate:.1f} |')
        print(f'with/without: {rates["with checksums"] / rates["without (baseline)"]:.3f}\n')
        seconds, size = verify_speed(scratch)
        print(f'| checking {size / 2**20:.0f} MiB (page cache) | median s | MB/s |\n|---|---:|---:|')
        for name, value in seconds.items():
            print(f'| {name} | {value:.2f} | {size / 1e6 / value:.0f} |')
        print(f'verify speed / sha256sum speed: {seconds["sha256sum"] / seconds["preservation.py verify"]:.2f}\n')
        print(f'verify of a 1 GiB original: peak resident memory {verify_memory(scratch):.0f} MiB')
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
    main()
