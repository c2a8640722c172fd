"""Cheap attacks on thumbnail conversion against a real `python server.py`: hostile PDFs, memory, sniffing.

Each test starts its own server on loopback with small bounds, so each runs in seconds.
"""

import collections
import os
import shutil
import struct
import threading
import time
import zlib
from urllib.parse import urlencode

import pytest

import server
from conftest import IMAGEMAGICK, KEY, RunningServer, make_image, multipart_body, wait_for
from test_thumbnails import TWO_PAGES, gif, nested_forms_pdf, pdf, with_fill_bytes


@pytest.fixture
def start(tmp_path):
    """Start `python server.py` with these settings (strings); stopped after the test."""
    started = []

    def launch(**settings):
        running = RunningServer(tmp_path / f'attachments{len(started)}', tmp_path / f'server{len(started)}.log',
                                ACCESS_LOG='false', PREGENERATE_SCALE='none', **settings)
        started.append(running)
        return running
    yield launch
    for running in started:
        running.stop()


def upload(web, name, data):
    content_type, body = multipart_body([('store', name), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', server.make_token(KEY, name)), ('file', name, data)])
    status, _headers, answer = web.request('POST', '/fileupload', body, {'Content-Type': content_type})
    assert (status, answer) == (200, b'Ok.')


def thumbnail(web, name, scale=123):
    """(status, headers, body, seconds taken) of GET /fileget for a thumbnail."""
    started = time.monotonic()
    status, headers, body = web.request('GET', '/fileget?' + urlencode(
        {'filename': name, 'type': 'T', 'coll': 'Fish', 'scale': scale}), timeout=60)
    return status, headers, body, time.monotonic() - started


def timed(web, path):
    started = time.monotonic()
    status, _headers, _body = web.request('GET', path, timeout=60)
    return status, time.monotonic() - started


def hostile_load(web, count):
    """Upload `count` nested-forms PDFs and start one thumbnail request for each; returns (threads, answers)."""
    for i in range(count):
        upload(web, f'forms{i}.pdf', nested_forms_pdf())
    answers = [None] * count

    def ask(i):
        answers[i] = thumbnail(web, f'forms{i}.pdf')
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


BOUNDED = {'THREADS': '8', 'THUMBNAIL_WORKERS': '1', 'THUMBNAIL_QUEUE': '2', 'THUMBNAIL_QUEUE_WAIT': '2',
           'THUMBNAIL_TIMEOUT': '6'}


TOOLS = {os.path.realpath(IMAGEMAGICK), os.path.realpath(shutil.which('gs'))}


def conversions_running(web):
    """Ghostscript or ImageMagick processes the server has running."""
    return [pid for pid, _name in children(web.process.pid) if is_tool(pid)]


def is_tool(pid):
    try:
        return os.path.realpath(f'/proc/{pid}/exe') in TOOLS
    except OSError:
        return False


def children(parent):
    """(pid, program name) of a process's children, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stat:
                head, rest = stat.read().rsplit(b')', 1)
            if int(rest.split()[1]) == parent:
                found.append((int(entry), head.split(b'(', 1)[1].decode('ascii', 'replace')))
        except (OSError, IndexError, ValueError):
            pass
    return found


def test_health_answers_at_once_while_hostile_pdfs_wait_for_conversion(start):
    web = start(**BOUNDED)
    threads, _answers = hostile_load(web, 10)
    try:
        assert wait_for(lambda: conversions_running(web), 30)
        status, seconds = timed(web, '/health')
    finally:
        for thread in threads:
            thread.join(60)
    assert (status, seconds < 2) == (200, True), seconds


def test_a_cached_thumbnail_is_served_at_once_while_hostile_pdfs_wait_for_conversion(start, tmp_path):
    web = start(**BOUNDED)
    upload(web, 'photo.jpg', make_image(tmp_path, 'plasma:', '300x200', 'jpg'))
    assert thumbnail(web, 'photo.jpg')[0] == 200                  # now cached
    threads, _answers = hostile_load(web, 10)
    try:
        assert wait_for(lambda: conversions_running(web), 30)
        status, _headers, _body, seconds = thumbnail(web, 'photo.jpg')
    finally:
        for thread in threads:
            thread.join(60)
    assert (status, seconds < 2) == (200, True), seconds


def test_hostile_pdfs_beyond_the_queue_are_answered_503_with_retry_after_and_the_rest_within_the_time_limit(start):
    web = start(**BOUNDED)
    started = time.monotonic()
    threads, answers = hostile_load(web, 10)
    for thread in threads:
        thread.join(60)
    statuses = collections.Counter(answer[0] for answer in answers)
    assert statuses == {503: 9, 404: 1}          # one converts; two wait 2 s in the queue; seven find it full
    assert all(answer[1]['Retry-After'] == '5' for answer in answers if answer[0] == 503)
    assert [answer[2] for answer in answers if answer[0] == 404] == [b'Making the thumbnail took too long.']
    assert time.monotonic() - started < 20


def test_a_second_request_for_a_failed_file_is_answered_at_once_with_the_same_reason(start):
    web = start(THUMBNAIL_TIMEOUT='3')
    upload(web, 'forms.pdf', nested_forms_pdf())
    first = thumbnail(web, 'forms.pdf')
    second = thumbnail(web, 'forms.pdf')
    assert (first[0], first[2]) == (second[0], second[2]) == (404, b'Making the thumbnail took too long.')
    assert first[3] >= 3
    assert second[3] < 0.5


def test_a_reupload_clears_the_remembered_failure(start, tmp_path):
    web = start(THUMBNAIL_TIMEOUT='3')
    upload(web, 'notebook.pdf', nested_forms_pdf())
    assert thumbnail(web, 'notebook.pdf')[0] == 404
    upload(web, 'notebook.pdf', pdf(tmp_path, TWO_PAGES))
    status, headers, _body, _seconds = thumbnail(web, 'notebook.pdf')
    assert (status, headers['Content-Type']) == (200, 'image/png')


def interlaced_png(width, height):
    """A black 16-bit RGBA Adam7 PNG, made without ImageMagick: decoders hold it whole (8 bytes a pixel)."""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    packer = zlib.compressobj(1)
    data = []
    for x0, y0, dx, dy in passes:
        columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if columns > 0 and rows > 0:
            row = bytes(1 + 8 * columns)
            data.extend(packer.compress(row) for _ in range(rows))
    data.append(packer.flush())

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 6, 0, 0, 1))
            + chunk(b'IDAT', b''.join(data)) + chunk(b'IEND', b''))


def peak_memory_of_children(web, request):
    """Run `request` in a thread; the largest VmPeak and VmHWM (bytes) of the server's ImageMagick and
    Ghostscript children meanwhile (not a child forked but not yet turned into one: that is the server's copy)."""
    peaks, answer = {'VmPeak:': 0, 'VmHWM:': 0}, []
    thread = threading.Thread(target=lambda: answer.append(request()))
    thread.start()
    while thread.is_alive():
        for pid, _name in children(web.process.pid):
            try:
                if not is_tool(pid):
                    continue
                with open(f'/proc/{pid}/status') as status:
                    for line in status:
                        if line.startswith(tuple(peaks)):
                            key, value = line.split(':')
                            peaks[key + ':'] = max(peaks[key + ':'], int(value.split()[0]) * 1024)
            except OSError:
                pass
        time.sleep(0.005)
    thread.join()
    return answer[0], peaks


def test_a_deep_png_is_refused_by_its_memory_estimate_before_any_conversion_runs(start):
    web = start()
    upload(web, 'deep.png', interlaced_png(11_000, 11_000))         # 968 MB decoded whole
    answer, peaks = peak_memory_of_children(web, lambda: thumbnail(web, 'deep.png'))
    assert (answer[0], answer[2]) == (404, b'The image would need too much memory to thumbnail.')
    assert peaks == {'VmPeak:': 0, 'VmHWM:': 0}


def test_a_conversion_past_the_estimate_stays_under_the_address_space_limit(start):
    limit = 512 * 1024 ** 2
    web = start(THUMBNAIL_MEMORY_LIMIT=str(4 * 1024 ** 3), THUMBNAIL_ADDRESS_SPACE_LIMIT=str(limit),
                THUMBNAIL_TIMEOUT='30')                           # the estimate passes it to ImageMagick
    upload(web, 'deep.png', interlaced_png(11_000, 11_000))
    answer, peaks = peak_memory_of_children(web, lambda: thumbnail(web, 'deep.png'))
    assert (answer[0], answer[2]) == (404, b'This file could not be thumbnailed.')
    assert 0 < peaks['VmPeak:'] <= limit


def test_a_jpeg_with_a_fill_byte_before_its_frame_is_refused_by_the_pixel_cap(start, tmp_path):
    web = start(THUMBNAIL_MAX_PIXELS='1000000')
    upload(web, 'filled.jpg', with_fill_bytes(make_image(tmp_path, 'plasma:', '2000x1000', 'jpg')))
    status, _headers, body, _seconds = thumbnail(web, 'filled.jpg')
    assert (status, body) == (404, b'The image has too many pixels to thumbnail.')


def test_a_gif_frame_larger_than_its_one_pixel_screen_is_refused_by_the_pixel_cap(start):
    web = start(THUMBNAIL_MAX_PIXELS='1000000')
    upload(web, 'screen.gif', gif((1, 1), [(0, 0, 10_000, 10_000)]))
    status, _headers, body, _seconds = thumbnail(web, 'screen.gif')
    assert (status, body) == (404, b'The image has too many pixels to thumbnail.')
