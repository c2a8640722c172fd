"""Many conversions at once inside the threaded Paste server: no hang, no error, nothing half-made, the cache bound kept."""

import collections
import concurrent.futures
import os
import time
from urllib.parse import urlencode

from harness.client import KEY, multipart_body
from harness.images import make_image
from harness.servers import RunningServer
from names import TEMP_PREFIX, thumbnail_source
from tokens import make_token

FILES, SCALES, CONCURRENCY = 20, 25, 16          # 500 distinct conversions


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
            return status, len(body)

        started = time.time()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(fetch, jobs, timeout=300))
        elapsed = time.time() - started
        print(f'\n{len(jobs)} conversions at concurrency {CONCURRENCY}: {elapsed:.1f} s')
        assert [status for status, _ in results] == [200] * len(jobs)
        assert all(size > 0 for _, size in results)
        thumbnails = os.listdir(tmp_path / 'attachments' / 'thumbnails')
        assert not [n for n in thumbnails if n.startswith(TEMP_PREFIX)]
        per_original = collections.Counter(thumbnail_source(n) for n in thumbnails)
        assert per_original == {name: 3 for name in names}       # THUMBNAIL_OTHER_SCALES: these scales are not configured
    finally:
        web.stop()
