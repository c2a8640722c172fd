"""Serving benchmark: how fast files come out, and whether /testkey stays quick under long downloads.

Run with `make bench-serve` (it installs wrk and curl from bench/packages.txt). All on loopback:

1. Requests per second (wrk, 2 threads, 16 connections, 5 s) for a cached thumbnail and for a
   2 MB original through the server under Paste, next to a bare Paste app that returns a
   constant, and next to nginx serving the same file from disk. A row whose answers were not
   all 2xx (wrk's "Non-2xx or 3xx responses", socket errors, or a first answer not 200) is
   marked, and the run then exits with an error.
2. The latency of /testkey (sequential requests for 10 s) while 32 clients download a 200 MB
   original at 2 MB/s each through nginx, with the server streaming the file itself and with
   FILE_OFFLOAD=nginx (nginx sends the file after the server checked the request).

`--seconds N` sets the length of each wrk run (default 5; the /testkey runs take twice that).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from bench.common import bare_paste_app, upload as upload_as, wrk
from harness.client import KEY
from harness.images import make_image
from harness.nginx import Nginx, start_nginx
from harness.processes import free_port, holds_listener, started, wait_for
from harness.servers import RunningServer
from tokens import make_token


def upload(web, name, data):
    upload_as(web, KEY, name, data)


def static_nginx(folder, root):
    """nginx serving `root` as static files on a free loopback port (retried if the port is taken)."""
    def launch():
        launch.port = free_port()
        process = start_nginx(folder, 'static', f'sendfile on; server {{ listen 127.0.0.1:{launch.port}; root {root}; }}')
        return process, lambda: ''
    process = started(launch, lambda p: holds_listener(p.pid, launch.port), 20)
    return process, launch.port


def throughput(work, seconds):
    web = RunningServer(work / 'attachments', work / 'server.log', ACCESS_LOG='false', PREGENERATE_SCALE='none',
                        MAX_REQUESTS_PER_CLIENT='32')     # wrk's 16 connections share one address
    bare, bare_port = bare_paste_app()
    static, static_port = static_nginx(work, work / 'attachments')
    try:
        upload(web, 'photo.jpg', make_image(work, 'plasma:', '1600x1200', 'jpg'))
        upload(web, 'original.bin', os.urandom(2 * 1024 * 1024))
        base = f'http://127.0.0.1:{web.port}/fileget?'
        thumb = base + urlencode({'filename': 'photo.jpg', 'type': 'T', 'scale': 123})
        assert web.request('GET', thumb[len(f'http://127.0.0.1:{web.port}'):])[0] == 200    # make it cached
        rates = {
            'bare Paste app (constant)': wrk(f'http://127.0.0.1:{bare_port}/', seconds),
            'cached thumbnail, server': wrk(thumb, seconds),
            'cached thumbnail, nginx static': wrk(f'http://127.0.0.1:{static_port}/thumbnails/photo_123.jpg', seconds),
            '2 MB original, server': wrk(base + urlencode({'filename': 'original.bin', 'type': 'O'}), seconds),
            '2 MB original, nginx static': wrk(f'http://127.0.0.1:{static_port}/originals/original.bin', seconds),
        }
    finally:
        web.stop()
        bare.terminate()
        static.terminate()
    return rates


def testkey_latency(work, offload, seconds):
    """/testkey latencies (ms) through nginx while 32 slow clients download a 200 MB original."""
    folder = work / ('offload' if offload else 'streamed')
    folder.mkdir()
    settings = {'FILE_OFFLOAD': 'nginx'} if offload else {}
    web = RunningServer(folder / 'attachments', folder / 'server.log', ACCESS_LOG='false',
                        PREGENERATE_SCALE='none', TRUST_PROXY_HEADERS='true', MAX_REQUESTS_PER_CLIENT='64', **settings)
    proxy = Nginx(folder, web.port, folder / 'attachments',      # 32 users, all from one loopback address here
                  changes={'limit_conn per_address 32;': 'limit_conn per_address 64;'})
    downloads = []
    try:
        big = folder / 'big.bin'
        with open(big, 'wb') as f:
            for _ in range(200):
                f.write(os.urandom(1024 * 1024))
        (folder / 'attachments' / 'originals').mkdir(parents=True, exist_ok=True)
        os.replace(big, folder / 'attachments' / 'originals' / 'big.bin')
        url = f'https://{proxy.name}:{proxy.https}/fileget?filename=big.bin&type=O'
        received = [folder / f'download-{i}' for i in range(32)]
        resolve = f'{proxy.name}:{proxy.https}:127.0.0.1'       # nginx answers only its server_name (SNI)
        downloads = [subprocess.Popen(['curl', '-sk', '--limit-rate', '2M', '--resolve', resolve, '-o', str(path), url])
                     for path in received]
        assert wait_for(lambda: all(path.exists() and path.stat().st_size for path in received), 60), \
            'the 32 downloads did not all start'
        latencies, deadline = [], time.time() + seconds
        while time.time() < deadline:
            query = '/testkey?' + urlencode({'random': '1', 'token': make_token(KEY, '1')})
            started = time.perf_counter()
            try:
                status = proxy.request('GET', query)[0]
            except OSError:
                status = 0
            latencies.append((time.perf_counter() - started) * 1000 if status == 200 else float('inf'))
        return latencies
    finally:
        for download in downloads:
            download.kill()
        proxy.stop()
        web.stop()


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main():
    parser = argparse.ArgumentParser(description='Serving benchmark on loopback.')
    parser.add_argument('--seconds', type=int, default=5, help='length of each wrk run (/testkey: twice this)')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='wast-serve-'))
    rates = throughput(work, args.seconds)
    bare = rates['bare Paste app (constant)'][0]
    print(f'Requests per second on loopback (wrk -t2 -c16 -d{args.seconds}s), {os.cpu_count()} CPUs\n')
    print('| what | requests/s | vs bare Paste app |')
    print('|---|---:|---:|')
    for label, (rate, problems) in rates.items():
        mark = f' (NOT ALL 2xx: {"; ".join(problems)})' if problems else ''
        print(f'| {label}{mark} | {rate:.0f} | {rate / bare:.0%} |')
    print(f'\n/testkey through nginx while 32 clients download a 200 MB original at 2 MB/s each '
          f'({2 * args.seconds} s)\n')
    print('| downloads served by | /testkey requests | median | 99th percentile | failed |')
    print('|---|---:|---:|---:|---:|')
    failed = 0
    for label, offload in [('the server (Paste)', False), ('nginx (FILE_OFFLOAD=nginx)', True)]:
        latencies = testkey_latency(work, offload, 2 * args.seconds)
        done = [value for value in latencies if value != float('inf')]
        failed += len(latencies) - len(done)
        p99 = percentile(latencies, 0.99)
        p99_text = f'{p99:.1f} ms' if p99 != float('inf') else 'failed'
        print(f'| {label} | {len(latencies)} | {statistics.median(latencies):.1f} ms | {p99_text} '
              f'| {len(latencies) - len(done)} |')
    wrong = [label for label, (_, problems) in rates.items() if problems]
    if wrong or failed:
        sys.exit(f'\nbench-serve: answers that were not 2xx in: {", ".join(wrong) or "-"}; '
                 f'failed /testkey requests: {failed}. The figures above do not count.')


if __name__ == '__main__':
    main()
