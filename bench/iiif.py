"""IIIF deep-zoom benchmark (issue 14): the server's IIIF answers for one 35 MP sheet, each next to a
baseline measured in the same run on the same file.

Run with `make bench-iiif` (it installs wrk, curl, libvips-tools and iipimage-server from
bench/packages.txt). The sheet is made once into bench/out/ with ImageMagick and kept: 7000x5000,
JPEG quality 90, about 11 MB; a desaturated plasma fractal with Gaussian grain for the paper, a drawn
stem with leaves, a white label with text and a colour chart: smooth areas, noise and sharp edges, as
a scanned herbarium sheet has. Its pyramid TIFF (`vips tiffsave --tile --pyramid --compression jpeg --Q 85`,
256 px tiles) is made in the same run and served by IIPImage, the anchor: iipsrv (Debian
iipimage-server 1.1, one FastCGI process, memcached off) behind nginx on loopback, IIIF 2.
Cantaloupe is not measured: it is no Debian package, and needs Java and a download of its own.

Our server is `python server.py` over a folder of its own, the sheet uploaded through /fileupload
(PREGENERATE_SCALE=none, the access log on, as deployed), asked IIIF 3. Tables:

1. First screen in a 1024x768 viewer: info.json, then exactly the tiles an OpenSeadragon-like viewer
   asks for its home view (from info.json: the smallest scale factor whose level fits the viewport
   whole, every tile of that level), six at a time as a browser (each on a connection of its own);
   each answer's pixel size checked. Cold is a freshly started server over a fresh folder (a fresh
   iipsrv), warm the same again.
2. Pyramid build: the vips command line's time, peak memory and bytes, next to the server's build
   as `server_build` measures it (first info.json and first tile on a fresh server: time, peak
   memory of the server and its children, bytes added to its folder): change that hook if the
   server builds in the background.
3. One cached tile fetched again (wrk), next to a bare Paste app answering a constant of the same
   size; the same for a cached thumbnail (/fileget?type=T&scale=123) and for IIPImage's tile. Only
   answers below 400 count (a 503 "busy" is marked, and makes the run exit with an error after the
   tables); CPU per request is the server's (and its children's; iipsrv's alone, not nginx's).
4. Distinct 512x512 regions at full resolution, one after another: median latency.

`--profile` then samples the server with py-spy (on PATH or beside this Python; `pip install
py-spy`) while wrk fetches the cached thumbnail, and prints where the time goes.
`--quick` makes a short trial (fewer runs, 2 s wrk runs).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from bench.common import OUT, CONVERT, PeakMemory, bare_paste_app, make, timed, upload, wrk, wrk_rates
from harness.client import KEY
from harness.nginx import start_nginx
from harness.processes import descendants, free_port, holds_listener, parent_pids, started, stop_process
from harness.servers import exchange, RunningServer

NAME = 'iiif-sheet-7000x5000.jpg'
WIDTH, HEIGHT = 7000, 5000
VIEWPORT = (1024, 768)
BROWSER = 6                 # connections a browser opens to one host
REGION = 512
THUMBNAIL_SCALE = 123
WRK_PATIENCE = 30           # seconds wrk waits for one answer: today's tiles are made from the original
IIPSRV = '/usr/lib/iipimage-server/iipsrv.fcgi'
WORK = os.path.join(OUT, 'iiif')


def draw(*primitives):
    """ImageMagick's arguments drawing each primitive in turn."""
    return [arg for primitive in primitives for arg in ('-draw', primitive)]


def make_sheet():
    """The 35 MP test sheet (made once, kept in bench/out/)."""
    leaves = [f'ellipse {x},{y} {rx},{ry} 0,360' for x, y, rx, ry in
              ((3300, 2750, 260, 110), (4300, 2250, 300, 120), (800, 1050, 240, 100), (2900, 700, 280, 120),
               (2000, 3300, 230, 90))]
    chart = [arg for n, colour in enumerate(('rgb(200,30,30)', 'rgb(30,160,40)', 'rgb(30,50,200)', 'black'))
             for arg in ('-fill', colour, *draw(f'rectangle {200 + 300 * n},4500 {500 + 300 * n},4800'))]
    return make(NAME, CONVERT, '-size', f'{WIDTH}x{HEIGHT}', '-seed', '14', 'plasma:wheat-darkolivegreen',
                '-modulate', '100,35', '-attenuate', '0.3', '+noise', 'Gaussian',
                '-fill', 'none', '-stroke', 'rgb(70,55,30)', '-strokewidth', '22',
                *draw('bezier 1200,4700 2200,3000 1800,1800 3100,400', 'bezier 2100,3100 2900,2700 3500,2900 4300,2300',
                      'bezier 1900,2000 1300,1500 900,1300 600,700'),
                '-stroke', 'rgb(40,70,30)', '-strokewidth', '4', '-fill', 'rgb(55,95,40)', *draw(*leaves),
                '-stroke', 'none', '-fill', 'rgb(250,248,240)', *draw('rectangle 4600,3600 6800,4800'),
                '-fill', 'black', '-pointsize', '110', *draw("text 4750,3850 'Herbarium sheet (bench)'"),
                '-pointsize', '80', *draw("text 4750,4050 'Quercus alba L.'",
                                          "text 4750,4250 'Coll. 14, 35 MP test sheet'",
                                          "text 4750,4450 '7000 x 5000, JPEG Q 90'"),
                *chart, '-quality', '90', 'jpeg:{out}')


# --- HTTP as a viewer asks ----------------------------------------------------------------------

def fetch(url, timeout=300):
    """The body of one GET on a fresh connection; anything but 200 stops the benchmark."""
    parts = urlsplit(url)
    target = parts.path + ('?' + parts.query if parts.query else '')
    status, _headers, body = exchange(http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout),
                                      'GET', target)
    assert status == 200, (url, status, body[:300])
    return body


def jpeg_size(data):
    """(width, height) from a JPEG's frame header; AssertionError for anything else."""
    assert data[:2] == b'\xff\xd8', data[:20]
    at = 2
    while at + 9 < len(data):
        marker, length = data[at + 1], struct.unpack('>H', data[at + 2:at + 4])[0]
        if 0xc0 <= marker <= 0xcf and marker not in (0xc4, 0xc8, 0xcc):
            height, width = struct.unpack('>HH', data[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise AssertionError('a JPEG without a frame header')


def home_view(info, viewport=VIEWPORT):
    """The image requests an OpenSeadragon-like viewer makes for its home view, from info.json: every tile
    of the sharpest level (smallest scale factor) that fits the viewport whole. [(path, (w, h))], factor."""
    width, height = info['width'], info['height']
    tiles = info['tiles'][0]
    tw, th = tiles['width'], tiles.get('height', tiles['width'])
    factors = sorted(tiles['scaleFactors'])
    fitting = [f for f in factors if math.ceil(width / f) <= viewport[0] and math.ceil(height / f) <= viewport[1]]
    factor = fitting[0] if fitting else factors[-1]
    version3 = 'image/3' in json.dumps(info.get('@context'))
    requests = []
    for y in range(0, height, th * factor):
        for x in range(0, width, tw * factor):
            w, h = min(tw * factor, width - x), min(th * factor, height - y)
            shown = (math.ceil(w / factor), math.ceil(h / factor))
            size = '{},{}'.format(*shown) if version3 else f'{shown[0]},'
            requests.append((f'{x},{y},{w},{h}/{size}/0/default.jpg', shown))
    return requests, factor


def first_screen(service):
    """A viewer's first screen: info.json, then its home tiles BROWSER at a time.
    (seconds, tiles, bytes, the level's scale factor)."""
    started_at = time.perf_counter()
    requests, factor = home_view(json.loads(fetch(service + '/info.json')))
    with concurrent.futures.ThreadPoolExecutor(BROWSER) as pool:
        tiles = list(pool.map(lambda request: fetch(f'{service}/{request[0]}'), requests))
    seconds = time.perf_counter() - started_at
    for (path, shown), tile in zip(requests, tiles):
        assert jpeg_size(tile) == shown, (path, jpeg_size(tile), shown)
    return seconds, len(tiles), sum(map(len, tiles)), factor


# --- the servers --------------------------------------------------------------------------------

def folder_bytes(folder):
    """Bytes of all files under a folder."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _dirs, names in os.walk(folder) for name in names)


class Ours(RunningServer):
    """python server.py over a fresh folder (nothing cached), the sheet uploaded; `service` is its IIIF 3 URL."""

    version = 3

    def __init__(self, folder, sheet):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        super().__init__(os.path.join(folder, 'attachments'), os.path.join(folder, 'server.log'),
                         PREGENERATE_SCALE='none', MAX_REQUESTS_PER_CLIENT='32')   # wrk's 16 share one address
        self.service = f'http://127.0.0.1:{self.port}/iiif/3/{NAME}'     # without COLLECTION_DIRS: the name
        self.pids = [self.process.pid]
        try:
            with open(sheet, 'rb') as f:
                upload(self, KEY, NAME, f.read())
        except BaseException:
            self.stop()
            raise

    def thumbnail_url(self):
        return f'http://127.0.0.1:{self.port}/fileget?' + urlencode({'filename': NAME, 'type': 'T',
                                                                     'scale': THUMBNAIL_SCALE})


class IIPImage:
    """iipsrv (one FastCGI process, nothing cached yet) behind nginx on loopback, serving `tiff`;
    `service` is its IIIF 2 URL. Ports are fresh and retried, as the tests' helpers do."""

    version = 2

    def __init__(self, folder, tiff):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.iipsrv = self._start_iipsrv(os.path.dirname(tiff))
        try:
            self.nginx = self._start_nginx()
        except BaseException:
            stop_process(self.iipsrv, patience=10)
            raise
        self.service = f'http://127.0.0.1:{self.port}/fcgi-bin/iipsrv.fcgi?IIIF={os.path.basename(tiff)}'
        self.pids = [self.iipsrv.pid]

    def _start_iipsrv(self, images):
        output = self.folder / 'iipsrv.out'

        def launch():
            launch.port = free_port()
            settings = dict(os.environ, FILESYSTEM_PREFIX=images + '/', LOGFILE=str(self.folder / 'iipsrv.log'),
                            VERBOSITY='1', MEMCACHED_SERVERS='', CORS='*')
            with open(output, 'wb') as out:
                process = subprocess.Popen([IIPSRV, '--bind', f'127.0.0.1:{launch.port}'], env=settings,
                                           stdout=out, stderr=subprocess.STDOUT)
            return process, lambda: output.read_text(errors='replace')
        process = started(launch, lambda p: holds_listener(p.pid, launch.port), 20)
        self.fcgi_port = launch.port
        return process

    def _start_nginx(self):
        def launch():
            launch.port = free_port()
            site = (f'server {{ listen 127.0.0.1:{launch.port}; location /fcgi-bin/iipsrv.fcgi {{ '
                    f'include /etc/nginx/fastcgi_params; fastcgi_pass 127.0.0.1:{self.fcgi_port}; }} }}')
            return start_nginx(self.folder, 'iip', site), lambda: ''
        process = started(launch, lambda p: holds_listener(p.pid, launch.port), 20)
        self.port = launch.port
        return process

    def stop(self):
        stop_process(self.nginx, patience=10)
        stop_process(self.iipsrv, patience=10)


def screens(start, runs):
    """(cold, warm) first screens (as first_screen answers) and the cold runs' peak memory: each run
    on a freshly started service, then once more on it."""
    cold, warm, peaks = [], [], []
    for n in range(runs):
        service = start(n)
        try:
            with PeakMemory(*service.pids) as memory:
                cold.append(first_screen(service.service))
            peaks.append(memory.peak)
            warm.append(first_screen(service.service))
        finally:
            service.stop()
    return cold, warm, peaks


# --- pyramid build ------------------------------------------------------------------------------

def vips_pyramid(sheet, out):
    """The yardstick: (seconds, peak resident bytes, output bytes) of the vips command line."""
    command = ['vips', 'tiffsave', sheet, out, '--tile', '--pyramid', '--compression', 'jpeg',
               '--tile-width', '256', '--tile-height', '256', '--Q', '85']
    with PeakMemory() as memory:
        started_at = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        memory.pids.add(process.pid)
        _out, errors = process.communicate()
        seconds = time.perf_counter() - started_at
    assert process.returncode == 0, errors[-300:]
    return seconds, memory.peak, os.path.getsize(out)


def server_build(web):
    """The hook for the server's own pyramid build: (seconds, peak resident bytes, bytes added to its folder)
    of the first info.json and then the first home tile on a fresh server: the first info.json builds and stores
    the pyramid, the tile is cut from it."""
    before = folder_bytes(web.base_dir)
    with PeakMemory(*web.pids) as memory:
        started_at = time.perf_counter()
        requests, _factor = home_view(json.loads(fetch(web.service + '/info.json')))
        fetch(f'{web.service}/{requests[0][0]}')
        seconds = time.perf_counter() - started_at
    return seconds, memory.peak, folder_bytes(web.base_dir) - before


# --- cached answers and regions -----------------------------------------------------------------

def cpu_seconds(pids):
    """CPU time used so far by some processes, their descendants and the descendants they reaped (from /proc)."""
    parents, total = parent_pids(), 0
    for pid in {*pids, *(kid for pid in pids for kid in descendants(pid, parents))}:
        try:
            with open(f'/proc/{pid}/stat', 'rb') as stat:
                total += sum(map(int, stat.read().rsplit(b')', 1)[1].split()[11:15]))
        except (OSError, ValueError):       # it ended meanwhile
            pass
    return total / os.sysconf('SC_CLK_TCK')


def settle(pids, most=60):
    """Wait (at most `most` seconds) until a server is idle: work it queued under wrk would slow the next row."""
    deadline, used = time.monotonic() + most, cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        used, before = cpu_seconds(pids), used
        if used - before < 0.05:
            return


def loaded(url, pids, seconds):
    """wrk_rates for `url`, and the CPU seconds its server (`pids` and their children) spent per request,
    counting the work it queued meanwhile (it is waited for)."""
    used = cpu_seconds(pids)
    outcome = wrk_rates(url, seconds, WRK_PATIENCE)
    settle(pids)
    return outcome, (cpu_seconds(pids) - used) / max(1, outcome[0] * seconds)


def rates(rows, seconds):
    """[(label, bytes, ((rate, answered rate, problems), CPU per request), the same for bare Paste)] for rows
    of (label, URL, the server's pids): a bare Paste app answering a constant of the URL's size under wrk,
    then the URL (after one GET that caches it)."""
    sized = [(label, url, pids, len(fetch(url))) for label, url, pids in rows]
    measured = []
    for label, url, pids, size in sized:
        bare, port = bare_paste_app(size)
        try:
            baseline = loaded(f'http://127.0.0.1:{port}/', [bare.pid], seconds)
        finally:
            stop_process(bare, patience=10)
        measured.append((label, size, loaded(url, pids, seconds), baseline))
    return measured


def home_tile(service):
    """The URL of the first tile of a service's home view."""
    requests, _factor = home_view(json.loads(fetch(service.service + '/info.json')))
    return f'{service.service}/{requests[0][0]}'


def regions(service, count):
    """Seconds for each of `count` distinct 512x512 regions at full resolution, one after another."""
    size = 'max' if service.version == 3 else 'full'
    took = []
    for n in range(count):
        x, y = (1234 + 733 * n) % (WIDTH - REGION), (2345 + 419 * n) % (HEIGHT - REGION)
        answer = []
        url = f'{service.service}/{x},{y},{REGION},{REGION}/{size}/0/default.jpg'
        took.append(timed(lambda: answer.append(fetch(url))))
        assert jpeg_size(answer[0]) == (REGION, REGION), jpeg_size(answer[0])
    return took


# --- where a cached thumbnail's time goes ------------------------------------------------------

def py_spy():
    found = shutil.which('py-spy') or os.path.join(os.path.dirname(sys.executable), 'py-spy')
    if not os.access(found, os.X_OK):
        raise SystemExit('--profile needs py-spy: pip install py-spy')
    return found


FRAME = re.compile(r'^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$')


def hot_spots(raw, top):
    """Print the functions sampled most, by own time and with their callees, from py-spy's raw stacks."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(' ')
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(';')[1:]:          # the first names the thread
            found = FRAME.match(frame)
            frames.append(f'{found["function"]} ({os.path.basename(found["file"])})' if found else frame)
        total += int(count)
        own[frames[-1] if frames else '(thread)'] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    print(f'\n{total} samples.')
    for title, counter in (('own time', own), ('with callees', inclusive)):
        print(f'\n| function, {title} | share of samples |')
        print('|---|---:|')
        for frame, count in counter.most_common(top):
            print(f'| {frame} | {100 * count / total:.1f} % |')


def profile(web, seconds):
    """Sample the server with py-spy while wrk fetches the cached thumbnail; print the hot spots. Only the
    thread holding the interpreter lock is sampled (--gil): py-spy takes Paste's idle threads, waiting on a
    condition, for running ones, and Python code runs only under that lock."""
    url = web.thumbnail_url()
    fetch(url)
    raw = os.path.join(WORK, 'thumbnail-profile.txt')
    spy = subprocess.Popen([py_spy(), 'record', '--pid', str(web.process.pid), '--duration', str(seconds),
                            '--rate', '200', '--gil', '--format', 'raw', '--output', raw],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    rate, problems = wrk(url, seconds - 2)
    _out, errors = spy.communicate(timeout=seconds + 60)
    assert spy.returncode == 0, errors.decode(errors='replace')[-500:]
    print(f'\n### Where a cached thumbnail\'s time goes: py-spy (200 Hz, the thread holding the GIL) under wrk '
          f'({rate:.0f} requests/s while sampled{"; NOT ALL 2xx" if problems else ""}); raw stacks in {raw}')
    with open(raw) as f:
        hot_spots(f.read(), 20)


# --- tables -------------------------------------------------------------------------------------

def mb(count):
    return f'{count / 2**20:.0f} MB'


def ms(seconds):
    return f'{seconds * 1000:.0f} ms'


def print_screens(runs, rows):
    print(f'\n### First screen in a {VIEWPORT[0]}x{VIEWPORT[1]} viewer: info.json + the home tiles, '
          f'{BROWSER} at a time (medians of {runs})\n')
    print('| server | tiles (level) | bytes | cold | warm | cold peak memory |')
    print('|---|---:|---:|---:|---:|---:|')
    for label, (cold, warm, peaks) in rows:
        _seconds, tiles, size, factor = cold[0]
        print(f'| {label} | {tiles} (1/{factor}) | {size / 1e3:.0f} kB | {ms(statistics.median(c[0] for c in cold))} '
              f'| {ms(statistics.median(w[0] for w in warm))} | {mb(max(peaks))} |')
    print('\nPeak memory: of the server and its children; of iipsrv alone. '
          'Goals: <= 1.5 s cold, <= 0.4 s with the pyramid cached (warm).')


def print_builds(runs, vips, ours):
    yardstick = statistics.median(v[0] for v in vips)
    print(f'\n### Pyramid build of the sheet (medians of {runs}; peak: the largest)\n')
    print('| build | time | vs vips | peak memory | bytes on storage |')
    print('|---|---:|---:|---:|---:|')
    for label, runs_of in (('`vips tiffsave --tile --pyramid --compression jpeg --Q 85`, 256 px tiles', vips),
                           ('server: first info.json + first tile on a fresh server', ours)):
        seconds = statistics.median(r[0] for r in runs_of)
        print(f'| {label} | {ms(seconds)} | {seconds / yardstick:.2f} | {mb(max(r[1] for r in runs_of))} '
              f'| {runs_of[0][2] / 1e6:.2f} MB |')
    print('\nGoals: time <= 1.2x vips, peak <= 150 MB.')


def print_rates(seconds, measured):
    print(f'\n### Cached answers fetched again: wrk -t2 -c16 -d{seconds}s, next to a bare Paste app '
          f'answering a constant of the same size\n')
    print('| what | bytes | requests/s answered < 400 | bare Paste requests/s | vs bare Paste '
          '| CPU per request | bare Paste\'s |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for label, size, ((every, rate, problems), cpu), ((baseline, _, bare_problems), bare_cpu) in measured:
        marks = [f'NOT ALL 2xx: {"; ".join(problems)}; {every:.0f}/s counting those'] if problems else []
        marks += [f'bare Paste NOT ALL 2xx: {"; ".join(bare_problems)}'] if bare_problems else []
        mark = f' ({"; ".join(marks)})' if marks else ''
        print(f'| {label}{mark} | {size / 1e3:.1f} kB | {rate:.1f} | {baseline:.0f} | {rate / baseline:.2f} '
              f'| {cpu * 1e6:.0f} µs | {bare_cpu * 1e6:.0f} µs |')
    print('\nGoal: >= 0.60 of the bare Paste app (a tile and the cached thumbnail).')


def print_regions(count, rows):
    print(f'\n### {count} distinct {REGION}x{REGION} regions at full resolution, one after another\n')
    print('| server | median | slowest |')
    print('|---|---:|---:|')
    for label, took in rows:
        print(f'| {label} | {ms(statistics.median(took))} | {ms(max(took))} |')
    print('\nGoal: <= 0.1 s from the pyramid.')


def main():
    parser = argparse.ArgumentParser(description='IIIF benchmark: the server next to baselines, same run.')
    parser.add_argument('--quick', action='store_true', help='a short trial: fewer runs, 2 s wrk runs')
    parser.add_argument('--profile', action='store_true', help='then profile the cached thumbnail with py-spy')
    args = parser.parse_args()
    runs, seconds, region_count = (2, 2, 3) if args.quick else (3, 5, 7)
    sheet = make_sheet()
    os.makedirs(WORK, exist_ok=True)
    tiff = os.path.join(WORK, 'sheet-pyramid.tif')
    vips = [vips_pyramid(sheet, tiff) for _ in range(runs)]
    print(f'## IIIF benchmark: {os.cpu_count()} CPUs; the sheet {NAME} ({WIDTH}x{HEIGHT}, '
          f'{os.path.getsize(sheet) / 1e6:.1f} MB){" (quick trial)" if args.quick else ""}')

    def ours(n):
        return Ours(os.path.join(WORK, f'ours-{n}'), sheet)

    def theirs(n):
        return IIPImage(os.path.join(WORK, f'iip-{n}'), tiff)

    print_screens(runs, [('ours (IIIF 3, Paste)', screens(ours, runs)),
                         ('IIPImage 1.1 behind nginx (IIIF 2)', screens(theirs, runs))])
    builds = []
    for n in range(runs):
        web = ours(f'build-{n}')
        try:
            builds.append(server_build(web))
        finally:
            web.stop()
    print_builds(runs, vips, builds)
    with contextlib.ExitStack() as running:
        web = ours('warm')
        running.callback(web.stop)
        iip = theirs('warm')
        running.callback(iip.stop)
        for service in (web, iip):
            first_screen(service.service)                 # the home tiles cached, as after a first view
        measured = rates([('ours: a home tile', home_tile(web), web.pids),
                          (f'ours: a cached thumbnail, /fileget?type=T&scale={THUMBNAIL_SCALE}', web.thumbnail_url(),
                           web.pids),
                          ('IIPImage: a home tile', home_tile(iip), iip.pids)], seconds)
        print_rates(seconds, measured)
        print_regions(region_count, [('ours', regions(web, region_count)), ('IIPImage', regions(iip, region_count))])
        if args.profile:
            profile(web, 6 if args.quick else 15)
    problems = [label for label, _size, ((*_rates, found), _cpu), ((*_bare, bare_found), _bare_cpu) in measured
                if found or bare_found]
    if problems:
        raise SystemExit(f'bench-iiif: answers that were not 2xx in: {", ".join(problems)}; '
                         'those figures do not count.')


if __name__ == '__main__':
    main()
