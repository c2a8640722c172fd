"""Thumbnail benchmark: cold thumbnails through the running server next to a plain `convert -resize`.

Run with `make bench` (or .venv/bin/python -m bench.thumbnails). It makes its own test set in
bench/out/ (kept between runs), starts `python server.py` on a free loopback port, and prints
Markdown tables: per format, the median cold latency at scale 123 through the server, the
median of a plain `convert IN -resize 123x123> OUT` of the same file in the same run, and their
ratio; then 16 concurrent cold requests for 16 copies of the big JPEG, next to 16 plain converts
at once, with wall time and peak resident memory: of the server's process and its children, and
of the 16 convert processes alone. `--runs N` and `--copies N` shorten a trial run.
"""

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import time
from urllib.parse import urlencode

from bench.common import CONVERT, OUT, PeakMemory, make, timed, upload
from harness.servers import RunningServer

KEY = 'benchmark-key'
RUNS = 3

PAGE = ('<< /PageSize [612 792] >> setpagedevice\n/Times-Roman findfont 14 scalefont setfont\n'
        '0 1 40 {{ /i exch def 72 740 i 16 mul sub moveto (Field notebook page {page}, line ) show '
        'i 10 string cvs show }} for\n0.2 0.5 0.2 setrgbcolor 300 100 200 200 rectfill showpage\n')


def make_inputs():
    os.makedirs(OUT, exist_ok=True)
    ps = os.path.join(OUT, 'notebook.ps')
    with open(ps, 'w') as f:
        f.write('%!PS\n' + ''.join(PAGE.format(page=n) for n in range(1, 13)))
    big = make('herbarium-sheet.jpg', CONVERT, '-size', '5000x7000', 'gradient:wheat-darkgreen',
               '-attenuate', '0.35', '+noise', 'Gaussian', '-quality', '92', 'jpeg:{out}')
    phone = make('phone.jpg', CONVERT, big, '-resize', '3024x4032!', '-quality', '90', 'jpeg:{out}')
    return [
        ('JPEG 5000x7000', big),
        ('TIFF 4000x5000 uncompressed', make('scan.tif', CONVERT, big, '-resize', '4000x5000!',
                                             '-compress', 'none', 'tiff:{out}')),
        ('TIFF 3 pages', make('pages.tif', CONVERT, '-size', '2000x2500', 'plasma:', 'xc:red', 'xc:blue',
                              'tiff:{out}')),
        ('PDF 12 pages', make('notebook.pdf', 'gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE',
                              '-sDEVICE=pdfwrite', '-o', '{out}', ps)),
        ('HEIC 3024x4032', make('phone.heic', 'heif-enc', '-q', '50', phone, '-o', '{out}')),
        ('PNG 2000x1500 alpha', make('label.png', CONVERT, '-size', '2000x1500', 'xc:none', '-fill',
                                     'rgba(200,30,30,0.7)', '-draw', 'circle 1000,750 1000,100', 'png:{out}')),
        ('GIF 800x600', make('map.gif', CONVERT, '-size', '800x600', 'plasma:', 'gif:{out}')),
    ]


class Server(RunningServer):
    """python server.py on a free loopback port (the tests' helper: retried ports, its own answers only)."""

    def __init__(self, base):
        super().__init__(base, os.path.join(OUT, 'server.log'), KEY=KEY, ACCESS_LOG='false',
                         PREGENERATE_SCALE='none', THREADS='32', MAX_REQUESTS_PER_CLIENT='64')

    def get(self, path):
        status, _headers, body = self.request('GET', path, timeout=300)
        return status, body

    def upload(self, name, path):
        with open(path, 'rb') as f:
            upload(self, KEY, name, f.read())

    def thumbnail(self, name, scale=123):
        status, body = self.get('/fileget?' + urlencode({'filename': name, 'type': 'T', 'scale': scale}))
        assert status == 200, (status, body[:200])
        return body


def plain_convert(path, out):
    return subprocess.run([CONVERT, path, '-resize', '123x123>', out], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description='Thumbnail benchmark: the server next to plain convert.')
    parser.add_argument('--runs', type=int, default=RUNS, help='cold runs per format (the median is shown)')
    parser.add_argument('--copies', type=int, default=16, help='concurrent cold thumbnails of the big JPEG')
    args = parser.parse_args()
    runs, copies = args.runs, args.copies
    inputs = make_inputs()
    base = os.path.join(OUT, 'attachments')
    shutil.rmtree(base, ignore_errors=True)
    web = Server(base)
    thumbs = os.path.join(base, 'thumbnails')
    try:
        print(f'ImageMagick: {CONVERT}; {os.cpu_count()} CPUs; medians of {runs} cold runs at scale 123\n')
        print('| file | size | server (cold) | plain convert -resize | speed-up |')
        print('|---|---:|---:|---:|---:|')
        for label, path in inputs:
            name = os.path.basename(path)
            web.upload(name, path)
            server_times, plain_times, plain_ok = [], [], True
            for _ in range(runs):
                shutil.rmtree(thumbs, ignore_errors=True)
                server_times.append(timed(lambda: web.thumbnail(name)))
                out = os.path.join(OUT, 'plain-' + name + '.out' + os.path.splitext(name)[1])
                result = []
                plain_times.append(timed(lambda: result.append(plain_convert(path, out))))
                plain_ok = plain_ok and result[0].returncode == 0
            ours, plain = statistics.median(server_times), statistics.median(plain_times)
            plain_text = f'{plain * 1000:.0f} ms' if plain_ok else 'fails (policy)'
            ratio = f'{plain / ours:.1f}x' if plain_ok else 'n/a'
            size = os.path.getsize(path)
            size_text = f'{size / 1e6:.1f} MB' if size >= 1e5 else f'{size / 1e3:.0f} kB'
            print(f'| {label} | {size_text} | {ours * 1000:.0f} ms | {plain_text} | {ratio} |')

        big = inputs[0][1]
        for i in range(copies):
            web.upload(f'sheet{i}.jpg', big)
        shutil.rmtree(thumbs, ignore_errors=True)
        with PeakMemory(web.process.pid) as memory:
            with concurrent.futures.ThreadPoolExecutor(copies) as pool:
                wall = timed(lambda: list(pool.map(lambda i: web.thumbnail(f'sheet{i}.jpg'), range(copies))))
        ours_peak = memory.peak
        started = time.perf_counter()
        plain = [subprocess.Popen([CONVERT, big, '-resize', '123x123>', os.path.join(OUT, f'plain-sheet{i}.jpg')],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(copies)]
        with PeakMemory(*(process.pid for process in plain)) as memory:    # the converts alone, not the server
            codes = [process.wait() for process in plain]
        plain_wall = time.perf_counter() - started
        assert codes == [0] * copies, codes
        print(f'\n{copies} concurrent cold thumbnails of the 5000x7000 JPEG (scale 123):\n')
        print('| | wall time | peak resident memory |')
        print('|---|---:|---:|')
        print(f'| server (process and children) | {wall:.2f} s | {ours_peak / 2**20:.0f} MB |')
        print(f'| {copies} plain convert -resize at once (their processes only) | {plain_wall:.2f} s '
              f'| {memory.peak / 2**20:.0f} MB |')
    finally:
        web.stop()


if __name__ == '__main__':
    main()
