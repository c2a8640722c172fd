"""Storage benchmark: upload and download throughput through the server, on disk and on S3.

Run with `.venv/bin/python -m bench.storage` (after `make test` has set things up). It starts a
SeaweedFS S3 server and two `python server.py` instances on loopback, one per storage, and for
each moves the same 256 MiB file up (multipart POST /fileupload) and down (GET /fileget) three
times, printing the median throughput, the S3/disk ratio and the server's peak resident memory.
"""

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from harness.client import KEY
from harness.seaweed import SeaweedFS
from harness.servers import RunningServer
from tokens import make_token

HERE = os.path.dirname(os.path.abspath(__file__))

SIZE, RUNS, BLOCK = 256 * 2**20, 3, os.urandom(2**20)


def upload(web, name):
    boundary = 'benchboundary'
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
    tail = (''.join(f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'
                    for k, v in [('store', name), ('type', 'O'), ('token', make_token(KEY, name))])
            + f'\r\n--{boundary}--\r\n').encode()

    def body():
        yield head
        for _ in range(SIZE // len(BLOCK)):
            yield BLOCK
        yield tail
    status, _, answer = web.request('POST', '/fileupload', body(), {
        'Content-Type': f'multipart/form-data; boundary={boundary}',
        'Content-Length': str(len(head) + SIZE + len(tail))}, timeout=600)
    assert (status, answer) == (200, b'Ok.'), (status, answer)


def download(web, name):
    import http.client
    connection = http.client.HTTPConnection('127.0.0.1', web.port, timeout=600)
    connection.request('GET', '/fileget?' + urlencode({'filename': name, 'type': 'O'}))
    answer, received = connection.getresponse(), 0
    while chunk := answer.read(2**20):
        received += len(chunk)
    connection.close()
    assert received == SIZE


class PeakMemory:
    """Samples the resident memory of `pid` every 50 ms from entering the block to leaving it: `peak` in bytes.
    The sampler thread starts before the block and is joined after it, so timing inside the block counts
    neither (about 26 ms each, 5-9% of the disk upload's time, when they were timed with the upload)."""

    def __init__(self, pid):
        self.pid, self.peak, self.running = pid, 0, True
        self.sampler = threading.Thread(target=self.sample)

    def sample(self):
        while self.running:
            with open(f'/proc/{self.pid}/status') as status:
                rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS:'))
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self):
        self.sampler.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.sampler.join()


def measure(web):
    ups, downs, peak = [], [], 0
    for run in range(RUNS):
        name = f'scan{run}.tif'
        with PeakMemory(web.process.pid) as memory:
            started = time.perf_counter()
            upload(web, name)
            ups.append(SIZE / (time.perf_counter() - started) / 2**20)
        peak = max(peak, memory.peak)
        started = time.perf_counter()
        download(web, name)
        downs.append(SIZE / (time.perf_counter() - started) / 2**20)
    return statistics.median(ups), statistics.median(downs), peak


def main():
    work = Path(tempfile.mkdtemp(prefix='wast-bench-'))
    (work / 'seaweed').mkdir()
    store = SeaweedFS(work / 'seaweed')
    results = {}
    try:
        for label, settings in [('disk', {}), ('S3 (SeaweedFS)', store.settings('bench'))]:
            web = RunningServer(work / label.split()[0], work / f'{label.split()[0]}.log', ACCESS_LOG='false',
                                PREGENERATE_SCALE='none', **{k: str(v) for k, v in settings.items()})
            try:
                results[label] = measure(web)
            finally:
                web.stop()
    finally:
        store.stop()
    disk = results['disk']
    print(f'{SIZE // 2**20} MiB file through the server on loopback, median of {RUNS}; {os.cpu_count()} CPUs\n')
    print('| storage | upload | download | peak server memory (upload) |')
    print('|---|---:|---:|---:|')
    for label, (up, down, peak) in results.items():
        print(f'| {label} | {up:.0f} MiB/s ({up / disk[0]:.2f}x) | {down:.0f} MiB/s ({down / disk[1]:.2f}x) '
              f'| {peak / 2**20:.0f} MB |')


if __name__ == '__main__':
    main()
