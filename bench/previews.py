"""Preview benchmark (issue 13): high-resolution previews through the server, each next to a baseline
measured in the same run.

Run with `make bench-previews` (it installs wrk, curl and libvips-tools from bench/packages.txt;
vipsthumbnail is only the yardstick). It makes its inputs in bench/out/ (kept between runs): 24
distinct 5000x7000 herbarium-sheet JPEGs (about 16 MB each) and a 12-page A4 PDF; starts `python
server.py` on a free loopback port (PREGENERATE_SCALE=none, the access log on, as deployed) and
prints Markdown tables:

1. Gallery page: the 24 cold sheets at scale=1000, six requests at a time, next to `vipsthumbnail
   --size 1000` doing the same 24 two at a time: wall time, throughput ratio, peak resident memory
   (of the server and its children; of the vips processes), and the page's bytes.
2. 123 px when the 1000 px preview is cached: made by a second server over the same files with
   PREGENERATE_SCALE=1000 (1000 is on its ladder), and by the server itself, pregeneration off,
   right after it made the 1000 px on request (ten sheets): median cold latency, next to the same
   123s made from the originals (their 1000s removed).
3. A cached 1000 px preview fetched again: wrk requests/s, next to a bare Paste app answering a
   constant of the same size (the access log on and off).
4. 256 px cold from a 35 MP JPEG, next to plain `convert IN -thumbnail 256x256 OUT`.
5. A 1000 px preview of the PDF: the answer's long side and time per request, next to Ghostscript
   rendering the same page at the same resolution.

`--quick` makes a short trial (6 sheets, fewer runs, 2 s wrk runs); `--only ROW` runs some rows.
"""

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
from urllib.parse import urlencode

from bench.common import OUT, CONVERT, PeakMemory, bare_paste_app, make, timed, upload, wrk
from kinds import image_size, kind_of
from names import thumbnail_name
from harness.servers import RunningServer

KEY = 'benchmark-key'
SHEETS = 24
GALLERY = 6              # requests at a time, as a browser makes to one host
VIPS_PARALLEL = 2        # the machine's cores when measured; os.cpu_count() is printed with the tables
ROWS = ('gallery', 'ladder', 'cached', 'cold256', 'pdf')
A4_PAGE = ('<< /PageSize [595 842] >> setpagedevice\n/Times-Roman findfont 12 scalefont setfont\n'
           '0 1 55 {{ /i exch def 56 800 i 13 mul sub moveto (Field notebook page {page}, line ) show '
           'i 10 string cvs show (: Quercus alba L., collected along the creek bank.) show }} for\n'
           '0.2 0.5 0.2 setrgbcolor 380 60 160 120 rectfill showpage\n')


def make_sheet(number):
    """One herbarium sheet: paper with grain, a dark specimen, a white label with text (about 16 MB)."""
    shades = ['wheat-darkgreen', 'ivory-olivedrab', 'linen-darkolivegreen', 'oldlace-seagreen']
    return make(f'herbarium-{number:02d}.jpg', CONVERT, '-size', '5000x7000', f'gradient:{shades[number % 4]}',
                '-seed', str(number), '-attenuate', '0.35', '+noise', 'Gaussian',
                '-stroke', 'rgb(60,45,25)', '-strokewidth', '18', '-fill', 'none',
                '-draw', f'bezier 2500,6600 {1500 + 90 * number},4000 3200,2500 {2200 + 40 * number},600',
                '-stroke', 'none', '-fill', 'rgb(250,248,240)', '-draw', 'rectangle 3100,5600 4800,6800',
                '-fill', 'black', '-pointsize', '90',
                '-draw', f"text 3250,5850 'Herbarium sheet {number}'",
                '-draw', "text 3250,6050 'Quercus alba L.'", '-quality', '92', 'jpeg:{out}')


def make_inputs(count):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sheets = list(pool.map(make_sheet, range(count)))
    os.makedirs(OUT, exist_ok=True)
    ps = os.path.join(OUT, 'notebook-a4.ps')
    with open(ps, 'w') as f:
        f.write('%!PS\n' + ''.join(A4_PAGE.format(page=n) for n in range(1, 13)))
    pdf = make('notebook-a4.pdf', 'gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=pdfwrite',
               '-o', '{out}', ps)
    return sheets, pdf


class Server(RunningServer):
    """python server.py over bench/out/previews (the tests' helper: retried ports, its own answers only)."""

    def __init__(self, log_name, **settings):
        settings = {'KEY': KEY, 'PREGENERATE_SCALE': 'none', 'MAX_REQUESTS_PER_CLIENT': '32', **settings}
        super().__init__(os.path.join(OUT, 'previews'), os.path.join(OUT, log_name), **settings)

    def thumbnail(self, name, scale, accept=None):
        query = urlencode({'filename': name, 'type': 'T', 'scale': scale})
        status, headers, body = self.request('GET', '/fileget?' + query, headers={'Accept': accept} if accept else None,
                                             timeout=300)
        assert status == 200, (status, body[:200])
        assert accept is None or headers['Content-Type'] == 'image/webp', headers
        return body

    def thumbnail_url(self, name, scale):
        return f'http://127.0.0.1:{self.port}/fileget?' + urlencode({'filename': name, 'type': 'T', 'scale': scale})


BROWSER = 'image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8'     # Chrome's Accept for images


def forget_thumbnails(paths, scale):
    """Remove the cached thumbnails of some originals at one scale, so the next requests for them are cold."""
    for path in paths:
        for webp in (False, True):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(OUT, 'previews', 'thumbnails', thumbnail_name(os.path.basename(path), scale, webp)))


def long_side(data):
    """The long side in pixels of a JPEG or PNG answer, from its header."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        size = image_size(f.name, kind_of(data[:1024]))
    return max(size.width, size.height)


def run_pool(commands, parallel, memory):
    """Run the commands `parallel` at a time, each process's pid in `memory.pids` while it runs."""
    def run(command):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        memory.pids.add(process.pid)
        _out, errors = process.communicate()
        memory.pids.discard(process.pid)
        assert process.returncode == 0, (command, errors[-300:])
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run, commands))


def mb(count):
    return f'{count / 2**20:.0f} MB'


def ms(seconds):
    return f'{seconds * 1000:.0f} ms'


def gallery(web, sheets):
    """Row 1: the cold gallery page through the server, then vipsthumbnail on the same files."""
    names = [os.path.basename(path) for path in sheets]
    forget_thumbnails(sheets, 1000)
    previews = []
    with PeakMemory(web.process.pid) as ours:
        with concurrent.futures.ThreadPoolExecutor(GALLERY) as pool:
            wall = timed(lambda: previews.extend(pool.map(lambda name: web.thumbnail(name, 1000), names)))
    sides = {long_side(preview) for preview in previews}
    webp = []
    with PeakMemory(web.process.pid) as webp_memory:
        with concurrent.futures.ThreadPoolExecutor(GALLERY) as pool:
            webp_wall = timed(lambda: webp.extend(pool.map(lambda name: web.thumbnail(name, 1000, BROWSER), names)))
    vips_out = os.path.join(OUT, 'vips')
    shutil.rmtree(vips_out, ignore_errors=True)
    os.makedirs(vips_out)
    commands = [['vipsthumbnail', path, '--size', '1000', '-o', os.path.join(vips_out, '%s.jpg')] for path in sheets]
    with PeakMemory() as theirs:
        vips_wall = timed(lambda: run_pool(commands, VIPS_PARALLEL, theirs))
    vips_bytes = sum(os.path.getsize(os.path.join(vips_out, entry)) for entry in os.listdir(vips_out))
    count = len(sheets)
    print(f'\n### Gallery page: {count} cold 5000x7000 JPEGs at scale=1000\n')
    print('| | wall time | previews/s | throughput vs vips | peak resident memory | page bytes |')
    print('|---|---:|---:|---:|---:|---:|')
    print(f'| server, {GALLERY} requests at a time (process and children) | {wall:.2f} s | {count / wall:.1f} '
          f'| {vips_wall / wall:.2f} | {mb(ours.peak)} | {sum(map(len, previews)) / 1e6:.2f} MB |')
    print(f'| the same as WebP (a browser\'s Accept), cold | {webp_wall:.2f} s | {count / webp_wall:.1f} '
          f'| {vips_wall / webp_wall:.2f} | {mb(webp_memory.peak)} | {sum(map(len, webp)) / 1e6:.2f} MB |')
    print(f'| vipsthumbnail --size 1000, {VIPS_PARALLEL} at a time (its processes) | {vips_wall:.2f} s '
          f'| {count / vips_wall:.1f} | 1 | {mb(theirs.peak)} | {vips_bytes / 1e6:.2f} MB |')
    print(f'\nLong side of the server\'s previews: {", ".join(map(str, sorted(sides)))} px. '
          f'Goals: throughput >= 0.8 of vips, server peak < 300 MB.')


def ladder(web, sheets):
    """Row 2: cold 123s made from each cached 1000 (by a server with 1000 on its ladder; by the server itself,
    pregeneration off, right after a 1000 asked for), then from the originals."""
    names = [os.path.basename(path) for path in sheets]
    for name in names:
        web.thumbnail(name, 1000)           # cached (the gallery row made them already, unless skipped)
    forget_thumbnails(sheets, 123)
    climbing = Server('previews-ladder.log', PREGENERATE_SCALE='1000')
    try:
        from_cached = [timed(lambda: climbing.thumbnail(name, 123)) for name in names]
    finally:
        climbing.stop()
    forget_thumbnails(sheets, 123)
    on_request = [timed(lambda: web.thumbnail(name, 123)) for name in names[:10]]    # its 1000s: other scales
    forget_thumbnails(sheets, 123)
    forget_thumbnails(sheets, 1000)
    from_original = [timed(lambda: web.thumbnail(name, 123)) for name in names]
    ours, requested, theirs = (statistics.median(found) for found in (from_cached, on_request, from_original))
    print(f'\n### 123 px, cold, {len(names)} sheets (medians)\n')
    print('| made from | sheets | median | slowest | speed-up |')
    print('|---|---:|---:|---:|---:|')
    print(f'| the cached 1000 px preview (PREGENERATE_SCALE=1000) | {len(from_cached)} | {ms(ours)} '
          f'| {ms(max(from_cached))} | {theirs / ours:.0f}x |')
    print(f'| the 1000 px made on request (pregeneration off) | {len(on_request)} | {ms(requested)} '
          f'| {ms(max(on_request))} | {theirs / requested:.0f}x |')
    print(f'| the 5000x7000 original | {len(from_original)} | {ms(theirs)} | {ms(max(from_original))} | 1x |')
    print('\nGoal: median <= 30 ms from the cached 1000 px.')


def cached(web, sheets, seconds):
    """Row 3: wrk on a cached 1000 px preview (access log on, then off), and on a bare Paste app of that size."""
    name = os.path.basename(sheets[0])
    size = len(web.thumbnail(name, 1000))
    quiet = Server('previews-quiet.log', ACCESS_LOG='false')
    bare, bare_port = bare_paste_app(size)
    try:
        rates = [('bare Paste app, a constant of the same size', wrk(f'http://127.0.0.1:{bare_port}/', seconds)),
                 ('server, access log on (as deployed)', wrk(web.thumbnail_url(name, 1000), seconds)),
                 ('server, ACCESS_LOG=false', wrk(quiet.thumbnail_url(name, 1000), seconds))]
    finally:
        quiet.stop()
        bare.terminate()
        bare.wait()
    baseline = rates[0][1][0]
    print(f'\n### A cached 1000 px preview ({size / 1e3:.0f} kB) fetched again: wrk -t2 -c16 -d{seconds}s\n')
    print('| what | requests/s | vs bare Paste app |')
    print('|---|---:|---:|')
    for label, (rate, problems) in rates:
        mark = f' (NOT ALL 2xx: {"; ".join(problems)})' if problems else ''
        print(f'| {label}{mark} | {rate:.0f} | {rate / baseline:.2f} |')
    print('\nGoal: >= 0.60 of the bare Paste app.')
    return [label for label, (_rate, problems) in rates if problems]


def cold256(web, sheets, runs):
    """Row 4: a cold 256 of a 35 MP JPEG through the server, next to plain convert -thumbnail."""
    path = sheets[0]
    name = os.path.basename(path)
    ours, theirs = [], []
    out = os.path.join(OUT, 'plain-256.jpg')
    for _ in range(runs):
        forget_thumbnails(sheets[:1], 256)
        ours.append(timed(lambda: web.thumbnail(name, 256)))
        theirs.append(timed(lambda: subprocess.run([CONVERT, path, '-thumbnail', '256x256', out], check=True,
                                                   capture_output=True)))
    ours, theirs = statistics.median(ours), statistics.median(theirs)
    print(f'\n### 256 px, cold, from a 5000x7000 (35 MP) JPEG (medians of {runs})\n')
    print('| | time | speed-up |')
    print('|---|---:|---:|')
    print(f'| server | {ms(ours)} | {theirs / ours:.1f}x |')
    print(f'| convert IN -thumbnail 256x256 OUT ({CONVERT}) | {ms(theirs)} | 1x |')
    print('\nGoal: >= 4x.')


def pdf(web, path, runs):
    """Row 5: a cold 1000 px preview of the PDF's first page, next to Ghostscript drawing it at that resolution."""
    web_name = os.path.basename(path)
    ours, sides = [], set()
    for _ in range(runs):
        forget_thumbnails([path], 1000)
        answer = []
        ours.append(timed(lambda: answer.append(web.thumbnail(web_name, 1000))))
        sides.add(long_side(answer[0]))
    resolution = 72 * 1000 / 842            # an A4 page (595x842 points) 1000 px long
    out = os.path.join(OUT, 'gs-page.png')
    command = ['gs', '-q', '-dSAFER', '-dBATCH', '-dNOPAUSE', '-sDEVICE=png16m', f'-r{resolution:.3f}',
               '-dFirstPage=1', '-dLastPage=1', '-dTextAlphaBits=4', '-dGraphicsAlphaBits=4', '-o', out, path]
    theirs = [timed(lambda: subprocess.run(command, check=True, capture_output=True)) for _ in range(runs)]
    with open(out, 'rb') as f:
        gs_side = long_side(f.read())
    ours, theirs = statistics.median(ours), statistics.median(theirs)
    print(f'\n### A 1000 px preview of a 12-page A4 PDF, cold (medians of {runs})\n')
    print('| | long side | time per request | vs Ghostscript alone |')
    print('|---|---:|---:|---:|')
    print(f'| server | {", ".join(map(str, sorted(sides)))} px | {ms(ours)} | {ours / theirs:.2f} |')
    print(f'| gs -r{resolution:.1f} of page 1 (png16m) | {gs_side} px | {ms(theirs)} | 1 |')
    print('\nGoal: long side 1000 px.')


def main():
    parser = argparse.ArgumentParser(description='Preview benchmark: the server next to a baseline, same run.')
    parser.add_argument('--quick', action='store_true', help='a short trial: 6 sheets, fewer runs, 2 s wrk runs')
    parser.add_argument('--only', action='append', choices=ROWS, help='run only this row (may be repeated)')
    args = parser.parse_args()
    count, runs, seconds = (6, 2, 2) if args.quick else (SHEETS, 5, 10)
    rows = args.only or ROWS
    sheets, notebook = make_inputs(count)
    shutil.rmtree(os.path.join(OUT, 'previews'), ignore_errors=True)
    web = Server('previews-server.log')
    problems = []
    try:
        for path in [*sheets, notebook]:
            with open(path, 'rb') as f:
                upload(web, KEY, os.path.basename(path), f.read())
        print(f'## Previews benchmark: {os.cpu_count()} CPUs, ImageMagick {CONVERT}'
              f'{" (quick trial)" if args.quick else ""}')
        if 'gallery' in rows:
            gallery(web, sheets)
        if 'ladder' in rows:
            ladder(web, sheets)
        if 'cached' in rows:
            problems = cached(web, sheets, seconds)
        if 'cold256' in rows:
            cold256(web, sheets, runs)
        if 'pdf' in rows:
            pdf(web, notebook, runs)
    finally:
        web.stop()
    if problems:
        raise SystemExit(f'bench-previews: answers that were not 2xx in: {", ".join(problems)}; '
                         'the figures above do not count.')


if __name__ == '__main__':
    main()
