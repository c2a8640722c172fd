"""Backfill benchmark: `derivatives.py generate` over 200 mixed originals, on disk and on S3, next to a live server.

Run with `make bench-backfill` (or .venv/bin/python -m bench.backfill). It makes its inputs in
bench/out/ (kept between runs): JPEGs of several sizes (a few 5000x7000 sheets among them), PNGs,
TIFFs and PDFs, 200 originals in all. For each storage (a folder, then SeaweedFS started as the
tests start it) it stores them as an existing collection would have them, starts `python server.py`
on that storage and fetches one cached 123 px thumbnail from it again and again, one request at a
time, 50 ms apart: first for a while with nothing else running (the baseline), then while `python
derivatives.py generate` (default jobs and nice) makes PREGENERATE_SCALE=1000,123 for all 200.
It prints a Markdown table: originals per second and wall time of the backfill, the live request's
median and 99th percentile latency during it and without it, and how long a rerun (everything
fresh) takes. `--baseline SECONDS` sets the baseline's length, `--interval SECONDS` the client's pace.
"""

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode


from bench.common import InBackground
from harness.client import multipart_body
from harness.seaweed import SeaweedFS
from harness.servers import RunningServer
from engines.imagemagick import find_imagemagick
from tokens import make_token

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
OUT = os.path.join(HERE, 'out')

CONVERT = find_imagemagick(None)
KEY = 'benchmark-key'
SCALES = '1000,123'
PAGE = ('<< /PageSize [595 842] >> setpagedevice\n/Helvetica findfont 11 scalefont setfont\n'
        '0 1 60 {{ /i exch def 60 790 i 12 mul sub moveto (Collecting notebook, page {page}, entry ) show '
        'i 10 string cvs show }} for\n0.3 0.4 0.2 setrgbcolor 320 80 200 160 rectfill showpage\n')


def make(name, *command):
    """One input file made by `command` unless bench/out already has it."""
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        subprocess.run([arg.replace('{out}', path) for arg in command], check=True, capture_output=True)
    return path


def make_inputs():
    """(path, copies) of each kind of original: 200 in all."""
    os.makedirs(OUT, exist_ok=True)
    ps = os.path.join(OUT, 'backfill-notebook.ps')
    with open(ps, 'w') as f:
        f.write('%!PS\n' + ''.join(PAGE.format(page=n) for n in (1, 2)))
    sheet = make('herbarium-sheet.jpg', CONVERT, '-size', '5000x7000', 'gradient:wheat-darkgreen',
                 '-attenuate', '0.35', '+noise', 'Gaussian', '-quality', '92', 'jpeg:{out}')
    return [
        (make('backfill-photo-1600.jpg', CONVERT, sheet, '-resize', '1600x1200!', '-quality', '88', 'jpeg:{out}'), 100),
        (make('backfill-photo-3000.jpg', CONVERT, sheet, '-resize', '3000x2250!', '-quality', '90', 'jpeg:{out}'), 40),
        (sheet, 10),
        (make('backfill-label-1500.png', CONVERT, sheet, '-resize', '1500x1000!', 'png:{out}'), 20),
        (make('backfill-scan-2000.tif', CONVERT, sheet, '-resize', '2000x1500!', '-compress', 'none',
              'tiff:{out}'), 20),
        (make('backfill-notebook.pdf', 'gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=pdfwrite',
              '-o', '{out}', ps), 10),
    ]


def originals(inputs):
    """(stored name, input path) of the 200 originals, kinds interleaved as a collection's would be."""
    named = [(f'{kind}-{n:03d}{os.path.splitext(path)[1]}', path)
             for kind, (path, copies) in enumerate(inputs) for n in range(copies)]
    return sorted(named, key=lambda item: item[0][2:])


def store_disk(folder, files):
    """The originals in an attachments folder as an existing collection has them (no thumbnails)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(folder, 'originals'))
    for name, path in files:
        shutil.copyfile(path, os.path.join(folder, 'originals', name))


def store_s3(seaweed, prefix, files):
    client = seaweed.client()
    for name, path in files:
        client.upload_file(path, seaweed.bucket, f'{prefix}/originals/{name}')


class Poller(InBackground):
    """Fetches one URL of a live server again and again, one request at a time, `interval` s apart (a client
    browsing, not a load test that would itself take a CPU from the backfill); the latency of each, in s."""

    def __init__(self, web, path, interval):
        super().__init__()
        self.web, self.path, self.interval, self.times = web, path, interval, []

    def run(self):
        while self.running:
            started = time.perf_counter()
            status, _headers, _body = self.web.request('GET', self.path, timeout=120)
            assert status == 200, status
            self.times.append(time.perf_counter() - started)
            time.sleep(self.interval)


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def backfill(environ):
    """Run derivatives.py generate to its end; (wall seconds, its summary line)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, 'derivatives.py', 'generate'], cwd=PROJECT, env=environ,
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    return wall, done.stdout.strip()


def measure(label, base, settings, files, baseline_seconds, interval):
    """One storage: baseline latency, then the backfill with latency alongside, then a rerun."""
    environ = dict(os.environ, BASE_DIR=str(base), KEY=KEY, PREGENERATE_SCALE=SCALES, **settings)
    web = RunningServer(base, os.path.join(OUT, f'backfill-{label.split()[0]}-server.log'), KEY=KEY,
                        ACCESS_LOG='false', PREGENERATE_SCALE='none', **settings)
    try:
        live = '/fileget?' + urlencode({'filename': 'live.jpg', 'type': 'T', 'scale': 123})
        with open(files[0][1], 'rb') as f:
            upload_live(web, f.read())
        assert web.request('GET', live, timeout=120)[0] == 200          # now cached
        with Poller(web, live, interval) as quiet:
            time.sleep(baseline_seconds)              # the baseline's length, not a synchronisation
        with Poller(web, live, interval) as busy:
            wall, summary = backfill(environ)
        rerun, _ = backfill(environ)
    finally:
        web.stop()
    return {'label': label, 'wall': wall, 'summary': summary, 'rerun': rerun, 'originals': int(summary.split()[0]),
            'busy': busy.times, 'quiet': quiet.times}


def upload_live(web, data):
    """The original whose cached thumbnail the live client fetches, stored through the server."""
    content_type, body = multipart_body([('store', 'live.jpg'), ('type', 'O'),
                                         ('token', make_token(KEY, 'live.jpg')), ('file', 'live.jpg', data)])
    status, _headers, answer = web.request('POST', '/fileupload', body, {'Content-Type': content_type}, timeout=300)
    assert answer == b'Ok.', (status, answer[:200])


def main():
    parser = argparse.ArgumentParser(description='Backfill benchmark: derivatives.py generate next to a live server.')
    parser.add_argument('--baseline', type=float, default=30, help='seconds of polling with no backfill running')
    parser.add_argument('--interval', type=float, default=0.05, help='seconds between the live client\'s requests')
    args = parser.parse_args()
    files = originals(make_inputs())
    work = Path(OUT) / 'backfill'
    shutil.rmtree(work, ignore_errors=True)
    (work / 'seaweed').mkdir(parents=True)
    seaweed = SeaweedFS(work / 'seaweed')
    results = []
    try:
        store_disk(work / 'disk', files)
        results.append(measure('disk', work / 'disk', {}, files, args.baseline, args.interval))
        prefix = 'backfill-' + secrets.token_hex(4)
        store_s3(seaweed, prefix, files)
        settings = {name: str(value) for name, value in seaweed.settings(prefix).items()}
        results.append(measure('S3 (SeaweedFS)', work / 's3-local', settings, files, args.baseline, args.interval))
    finally:
        seaweed.stop()
    kinds = ', '.join(f'{copies} x {os.path.basename(path)}' for path, copies in make_inputs())
    print(f'{len(files)} originals ({kinds}) and the live one; PREGENERATE_SCALE={SCALES}; derivatives.py generate with its '
          f'defaults (--jobs {os.cpu_count()}, --nice 10); {os.cpu_count()} CPUs. Live: GET of a cached 123 px '
          'thumbnail, one request at a time, '
          f'{args.interval * 1000:.0f} ms apart, a new connection each.\n')
    print('| storage | originals/s | wall time | live latency during backfill (median / p99) '
          '| live latency, no backfill (median / p99) | rerun, all fresh |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in results:
        busy, quiet = r['busy'], r['quiet']
        print(f"| {r['label']} | {r['originals'] / r['wall']:.2f} | {r['wall']:.1f} s "
              f"| {statistics.median(busy) * 1000:.1f} / {percentile(busy, 0.99) * 1000:.1f} ms ({len(busy)} requests) "
              f"| {statistics.median(quiet) * 1000:.1f} / {percentile(quiet, 0.99) * 1000:.1f} ms ({len(quiet)} requests) "
              f"| {r['rerun']:.1f} s |")
    print()
    for r in results:
        print(f"{r['label']}: {r['summary']}")


if __name__ == '__main__':
    main()
