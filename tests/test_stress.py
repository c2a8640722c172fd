"""Many conversions at once inside the threaded Paste server: no hang, no error, nothing half-made, every thumbnail
of its exact size, the originals intact, the cache bound kept."""

import collections
import concurrent.futures
import os
import subprocess
import time
from urllib.parse import urlencode

import pytest

from harness.client import KEY, multipart_body
from harness.images import IMAGEMAGICK, make_image
from harness.servers import RunningServer
from names import TEMP_PREFIX, thumbnail_source
from tokens import make_token

pytestmark = pytest.mark.serial          # timed against the machine: run alone, not beside another worker

FILES, SCALES, CONCURRENCY = 20, 25, 16          # 500 distinct conversions


def decoded(bodies, folder):
    """(format, width, height) of each image, decoded by one ImageMagick run over them all."""
    paths = []
    for i, body in enumerate(bodies):
        paths.append(folder / f'answer-{i}')
        paths[-1].write_bytes(body)
    listed = subprocess.run([IMAGEMAGICK, *map(str, paths), '-format', '%m %w %h\n', 'info:'], check=True,
                            capture_output=True, text=True, timeout=300).stdout.split('\n')
    return [(kind, int(width), int(height)) for kind, width, height in (line.split() for line in listed if line)]


def test_500_conversions_at_concurrency_16_all_finish(tmp_path):
    web = RunningServer(tmp_path / 'attachments', tmp_path / 'server.log', THREADS='24', ACCESS_LOG='false',
                        MAX_REQUESTS_PER_CLIENT='32',      # its 16 clients share one address
                        PREGENERATE_SCALE='none')
    try:
        images = [make_image(tmp_path, 'plasma:', '160x120', 'jpg'), make_image(tmp_path, 'plasma:', '160x120', 'png')]
        names = [f'{i}.{"jpg" if i % 2 == 0 else "png"}' for i in range(FILES)]
        for i, name in enumerate(names):
            content_type, body = multipart_body([('file', name, images[i % 2]), ('store', name), ('type', 'O'),
                                                 ('token', make_token(KEY, name))])
            assert web.request('POST', '/fileupload', body, {'Content-Type': content_type})[0] == 200
        jobs = [(name, scale) for name in names for scale in range(20, 20 + SCALES)]

        def fetch(job):
            name, scale = job
            status, headers, body = web.request('GET', '/fileget?' + urlencode(
                {'filename': name, 'type': 'T', 'scale': scale}), timeout=120)
            return status, body

        started = time.time()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(fetch, jobs, timeout=300))
        elapsed = time.time() - started
        print(f'\n{len(jobs)} conversions at concurrency {CONCURRENCY}: {elapsed:.1f} s')
        assert [status for status, _ in results] == [200] * len(jobs)
        (tmp_path / 'answers').mkdir()
        thumbnails = decoded([body for _, body in results], tmp_path / 'answers')
        kinds = {'jpg': 'JPEG', 'png': 'PNG'}          # 160x120: the long side is the scale, the other 3/4 of it, halves up
        assert thumbnails == [(kinds[name[-3:]], scale, (3 * scale + 2) // 4) for name, scale in jobs]
        for i, name in enumerate(names):
            assert web.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))[2] == images[i % 2]
        cached = os.listdir(tmp_path / 'attachments' / 'thumbnails')
        assert not [n for n in cached if n.startswith(TEMP_PREFIX)]
        per_original = collections.Counter(thumbnail_source(n) for n in cached)
        assert per_original == {name: 3 for name in names}       # THUMBNAIL_OTHER_SCALES: these scales are not configured
    finally:
        web.stop()
