"""A whole institution behind Specify 7's nginx (issue 21), each figure next to a baseline from the same run.

Run with `make bench-institution`. It uses the stack of tests/test_specify7_stack.py: `python server.py` with
only the stock composition's four variables behind Specify 7's nginx location (and the README's), 40 browsers
from 40 loopback addresses with six kept-alive connections each, and prints Markdown tables:

1. A gallery of 40 thumbnails (3000x2000 JPEGs, nothing cached) loaded by the 40 browsers at once, cold then
   warm, with and without one address flooding (100 connections, about 200 requests/s): answers by status,
   wall time, median and slowest answer. Baseline: the same 1600 answers of the same bytes served by that
   nginx itself from files.
2. A browser's first view of a thumbnail after its upload, and what an upload's pregeneration costs, for the
   two choices the issue names: pregenerate only the plain thumbnail and answer it until the WebP is made in
   the background (chosen), or make the WebP too. Medians over the sheets.
"""

import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT
from harness.nginx import start_nginx
from harness.processes import free_port, holds_listener, started, stop_process
from harness.servers import RunningServer
from engines.imagemagick import find_imagemagick

sys.path.append(os.path.join(os.path.dirname(OUT), os.pardir, 'tests'))   # the Specify 7 site of the stack test
import test_specify7_stack as stack  # noqa: E402

SHEETS = 12


class Folder:
    """What the stack fixture asks of pytest's tmp_path_factory."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix='bench-institution-'))

    def mktemp(self, name):
        path = self.base / name
        path.mkdir()
        return path


def gallery_row(label, answers, wall):
    seconds = sorted(second for _, _, second, _ in answers)
    statuses = collections.Counter(status for status, *_ in answers)
    shown = ', '.join(f'{count} × {status}' for status, count in sorted(statuses.items()))
    return (f'| {label} | {shown} | {wall:.2f} s | {statistics.median(seconds) * 1000:.0f} ms '
            f'| {seconds[-1] * 1000:.0f} ms |')


def load(port, paths):
    started_at = time.perf_counter()
    answers = stack.browsers(port, [paths] * stack.USERS)
    return answers, time.perf_counter() - started_at


def static_nginx(folder, files_folder):
    """nginx serving `files_folder` itself, as the yardstick for answers that need no work."""
    port = free_port()
    site = f'server {{ listen 127.0.0.1:{port}; location / {{ root {files_folder}; }} }}'
    process = started(lambda: (start_nginx(folder, 'static', site, 'worker_connections 1024;'), lambda: ''),
                      lambda p: holds_listener(p.pid, port), 20, attempts=1)
    return process, port


def institution(folder):
    fixture = stack.stack.__wrapped__(folder)
    web, nginx = next(fixture)
    try:
        gallery = [stack.thumbnail_path(f'sheet{i}.jpg', 123) for i in range(stack.GALLERY)]
        rows = []
        for flooded in (False, True):
            for name in os.listdir(web.base_dir / 'thumbnails') if (web.base_dir / 'thumbnails').exists() else []:
                os.unlink(web.base_dir / 'thumbnails' / name)
            flood = stack.Flood(nginx.port, rate_per_connection=2) if flooded else None
            time.sleep(1 if flooded else 0)
            cold = load(nginx.port, gallery)
            flood_answers = flood.stop() if flood else None
            warm = load(nginx.port, gallery)
            suffix = ', one address flooding' if flooded else ''
            rows.append(gallery_row(f'cold{suffix}', *cold))
            rows.append(gallery_row('warm', *warm))
            if flood_answers:
                shown = ', '.join(f'{count} × {status}' for status, count in sorted(flood_answers.items()))
                rows.append(f'| the flooding address, meanwhile | {shown} | | | |')
        files = folder.mktemp('static')
        for index in range(stack.GALLERY):
            shutil.copy(web.base_dir / 'thumbnails' / f'sheet{index}_123_webp.jpg', files / f'sheet{index}.webp')
        process, port = static_nginx(folder.mktemp('static-nginx'), files)
        try:
            rows.append(gallery_row('baseline: nginx sending the same WebP files itself',
                                    *load(port, [f'/sheet{i}.webp' for i in range(stack.GALLERY)])))
        finally:
            stop_process(process, 10)
    finally:
        next(fixture, None)
    print(f'\n### {stack.USERS} browsers × {stack.GALLERY} thumbnails through Specify 7\'s nginx, stock settings\n')
    print('| load | answers | wall time | median answer | slowest answer |')
    print('|---|---|---:|---:|---:|')
    print('\n'.join(rows))


def first_views(folder):
    """Per sheet: pregeneration's cost (plain, then the WebP too) and a browser's first view afterwards."""
    photo = folder.base / 'photo.jpg'
    server_folder = folder.mktemp('first-views')
    web = RunningServer(server_folder / 'attachments', server_folder / 'server.log', PREGENERATE_SCALE='none',
                        MAX_REQUESTS_PER_CLIENT='32')
    try:
        subprocess.run([stack.IMAGEMAGICK, '-size', '3000x2000', 'gradient:#306030-#c0a060', '-attenuate', '0.2',
                        '+noise', 'Gaussian', '-quality', '90', str(photo)], check=True, timeout=120)
        originals = server_folder / 'attachments' / 'originals'
        originals.mkdir(parents=True, exist_ok=True)
        plain, served_plain, converted_webp = [], [], []
        for index in range(SHEETS):
            name = f'first{index}.jpg'
            shutil.copy(photo, originals / name)
            path = stack.thumbnail_path(name, 123)
            plain.append(timed_get(web, path, 'image/jpeg'))            # what pregeneration makes: the plain one
            served_plain.append(timed_get(web, path, stack.BROWSER_ACCEPT, expect='image/jpeg'))
            other = f'other{index}.jpg'
            shutil.copy(photo, originals / other)
            converted_webp.append(timed_get(web, stack.thumbnail_path(other, 123), stack.BROWSER_ACCEPT))
    finally:
        web.stop()
    median = statistics.median
    print(f'\n### A browser\'s first view of a just-uploaded sheet, 123 px (medians of {SHEETS} 3000x2000 JPEGs)\n')
    print('| choice | pregeneration per upload | browser\'s first view | vs making the WebP then |')
    print('|---|---:|---:|---:|')
    print(f'| plain pregenerated, WebP made in the background (chosen) | {median(plain) * 1000:.0f} ms '
          f'| {median(served_plain) * 1000:.1f} ms | {median(served_plain) / median(converted_webp):.3f} |')
    print(f'| plain and WebP pregenerated | {(median(plain) + median(converted_webp)) * 1000:.0f} ms '
          f'| {median(served_plain) * 1000:.1f} ms (a cached file alike) | — |')
    print(f'| plain pregenerated, WebP made on the first view (before) | {median(plain) * 1000:.0f} ms '
          f'| {median(converted_webp) * 1000:.0f} ms | 1 |')


def timed_get(web, path, accept, expect=None):
    started_at = time.perf_counter()
    status, headers, _ = web.request('GET', path, headers={'Accept': accept})
    took = time.perf_counter() - started_at
    assert status == 200 and (expect is None or headers['Content-Type'] == expect), (status, headers)
    return took


def main():
    folder = Folder()
    try:
        print(f'## Institution benchmark: {os.cpu_count()} CPUs, ImageMagick {find_imagemagick(None)}')
        institution(folder)
        first_views(folder)
    finally:
        shutil.rmtree(folder.base, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
