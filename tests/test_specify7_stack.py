"""The server where most institutions run it: inside Specify 7's composition, behind Specify 7's own nginx,
with only the four variables that composition gives it, for a whole institution at once.

Specify 7's nginx location for the asset server is written here from the directives of its `nginx.conf`
(the path pattern, `client_max_body_size 0`, a variable `proxy_pass`, `Host`, `X-Real-IP` and
`X-Forwarded-For`), Docker's resolver and service name swapped for loopback; the location the README adds
for `/iiif/` and the capabilities document is taken from the README itself. nginx runs as in the official
image (2 workers here, 1024 connections each). Each browser comes from a loopback address of its own with
six kept-alive connections, as browsers open per host."""

import collections
import http.client
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import time

import pytest
import yaml

from harness.images import IMAGEMAGICK
from harness.nginx import start_nginx
from harness.processes import free_port, holds_listener, PROJECT, started, stop_process
from harness.servers import exchange, RunningServer
from test_compose import compose_schema, schema_errors  # noqa: F401 (a fixture)
from tokens import make_token

pytestmark = pytest.mark.serial          # timed against the machine: run alone, not beside another worker

STOCK_KEY = 'stock composition key'
BROWSER_ACCEPT = 'image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8'
USERS, CONNECTIONS_PER_USER, GALLERY = 40, 6, 40
FLOOD_CONNECTIONS = 100
SPECIFY7_LOCATION = '''
    location ~ ^/(fileget|fileupload|filedelete|getmetadata|testkey|web_asset_store.xml) {
        client_max_body_size 0;
        set $backend "http://asset-server:8080";
        proxy_pass $backend;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }
'''


def readme_block(language, containing):
    """The README's fenced `language` block that contains `containing`."""
    with open(os.path.join(PROJECT, 'README.md')) as f:
        blocks = re.findall(rf'^```{language}\n(.*?)^```', f.read(), re.M | re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f'the README has {len(found)} {language} blocks with {containing!r}'
    return found[0]


def for_loopback(location, upstream_port):
    """A location of Specify 7's nginx with Docker's resolver and service name swapped for loopback."""
    return (location.replace('        resolver 127.0.0.11 valid=30s;\n', '')
            .replace('http://asset-server:8080', f'http://127.0.0.1:{upstream_port}'))


class Specify7Nginx:
    """Specify 7's site with its asset-server location and the README's, on 127.0.0.1:`port`."""

    def __init__(self, folder, port, upstream_port):
        locations = for_loopback(SPECIFY7_LOCATION + readme_block('nginx', 'location ~ ^/(iiif/'), upstream_port)
        site = (f'server {{\n    listen 127.0.0.1:{port};\n    server_name localhost;\n'
                f'    client_max_body_size 128M;\n{locations}\n}}\n')
        self.port, error_log = port, folder / 'specify7-nginx-error.log'
        self.process = started(lambda: (start_nginx(folder, 'specify7-nginx', site, 'worker_connections 1024;'),
                                        lambda: error_log.read_text() if error_log.exists() else ''),
                               lambda process: holds_listener(process.pid, port), 20, attempts=1)

    def request(self, method, path, body=None, headers=None, source='127.0.0.1', timeout=120):
        return exchange(http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout,
                                                   source_address=(source, 0)), method, path, body, headers)

    def stop(self):
        stop_process(self.process, patience=10)


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    """`python server.py` with exactly the stock composition's variables (and the image's HOST, PORT and
    BASE_DIR, made loopback), Specify 7's nginx in front; originals placed as a migrated collection has them."""
    folder = tmp_path_factory.mktemp('specify7')
    public_port = free_port()
    web = RunningServer(folder / 'attachments', folder / 'server.log', KEY=None, SERVER_NAME='127.0.0.1',
                        SERVER_PORT=str(public_port), ATTACHMENT_KEY=STOCK_KEY, DEBUG_MODE='false')
    nginx = Specify7Nginx(folder, public_port, web.port)
    photo = folder / 'photo.jpg'
    subprocess.run([IMAGEMAGICK, '-size', '3000x2000', 'gradient:#306030-#c0a060', '-attenuate', '0.2',
                    '+noise', 'Gaussian', '-quality', '90', str(photo)], check=True, timeout=120)
    originals = folder / 'attachments' / 'originals'
    originals.mkdir(parents=True, exist_ok=True)
    data = photo.read_bytes()
    for name in [f'sheet{i}.jpg' for i in range(GALLERY)] + [f'preview{i}.jpg' for i in range(USERS)]:
        (originals / name).write_bytes(data)
    yield web, nginx
    nginx.stop()
    web.stop()


def thumbnail_path(name, scale):
    return f'/fileget?coll=Fish&type=T&filename={name}&scale={scale}'


def browse(port, source, paths, accept=BROWSER_ACCEPT, connections=CONNECTIONS_PER_USER):
    """Fetch `paths` as one browser does: over `connections` kept-alive connections from `source`.
    Returns (status, content type, seconds, first bytes) per path; an error counts as status 0."""
    work, answers = queue.Queue(), []
    for path in paths:
        work.put(path)

    def one_connection():
        connection = None
        while True:
            try:
                path = work.get_nowait()
            except queue.Empty:
                break
            started_at = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120,
                                                            source_address=(source, 0))
                connection.request('GET', path, headers={'Accept': accept})
                answer = connection.getresponse()
                body = answer.read()
                answers.append((answer.status, answer.headers['Content-Type'], time.monotonic() - started_at,
                                body[:4]))
                if answer.will_close:
                    connection.close()
                    connection = None
            except OSError as error:
                answers.append((0, repr(error), time.monotonic() - started_at, b''))
                connection = None
        if connection:
            connection.close()
    threads = [threading.Thread(target=one_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return answers


def browsers(port, paths_of_user):
    """Every user browsing at once, each from 127.0.0.<10 + its number>: their answers, user by user."""
    results = [None] * len(paths_of_user)

    def user(number):
        results[number] = browse(port, f'127.0.0.{10 + number}', paths_of_user[number])
    threads = [threading.Thread(target=user, args=(number,)) for number in range(len(paths_of_user))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return [answer for answers in results for answer in answers]


FLOOD_SCRIPT = """
import collections, http.client, json, random, sys, threading
port, source, connections, RATE_PER_CONNECTION = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
statuses, lock, stopping = collections.Counter(), threading.Lock(), threading.Event()

def ask():
    while not stopping.wait(1 / RATE_PER_CONNECTION):
        path = '/fileget?coll=Fish&type=T&filename=sheet%d.jpg&scale=%d' % (random.randrange(40),
                                                                             random.randrange(200, 1000))
        try:
            connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120, source_address=(source, 0))
            connection.request('GET', path, headers={'Accept': 'image/webp,*/*'})
            status = connection.getresponse().status
            connection.close()
        except OSError:
            status = 0
        with lock:
            statuses[status] += 1

threads = [threading.Thread(target=ask) for _ in range(connections)]
for thread in threads:
    thread.start()
sys.stdin.read()                 # until the test closes our standard input
stopping.set()
for thread in threads:
    thread.join()
print(json.dumps(statuses))
"""


class Flood:
    """FLOOD_CONNECTIONS connections from one address, in a process of their own (so that they do not take the
    browsers' interpreter lock), each asking `rate_per_connection` times a second (by default a hundred requests
    a second in all) for thumbnails of scales nobody else asks for, each a conversion, until stopped. Paced,
    because on a machine of 2 CPUs an unpaced flooding process takes a CPU from the server itself, which no
    server can refuse."""

    def __init__(self, port, source='127.0.0.250', rate_per_connection=1):
        self.process = subprocess.Popen([sys.executable, '-c', FLOOD_SCRIPT, str(port), source, str(FLOOD_CONNECTIONS),
                                         str(rate_per_connection)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def stop(self):
        """Its answers by status (0: a connection error), once every connection has had its last answer."""
        output, _ = self.process.communicate(timeout=180)
        return collections.Counter({int(status): count for status, count in json.loads(output).items()})


def summary(answers):
    return collections.Counter((status, kind) for status, kind, _seconds, _start in answers)


# --- A whole institution through one nginx -------------------------------------------------------------------

def test_40_browsers_load_a_gallery_of_40_thumbnails_cold_then_warm_all_200_while_a_flood_is_refused_alone(stack):
    web, nginx = stack
    gallery = [thumbnail_path(f'sheet{i}.jpg', 123) for i in range(GALLERY)]
    flood = Flood(nginx.port)
    try:
        time.sleep(1)                                  # the flood is under way before the museum opens
        cold = browsers(nginx.port, [gallery] * USERS)
    finally:
        flooded = flood.stop()
    warm = browsers(nginx.port, [gallery] * USERS)
    expected = {(200, 'image/webp'): USERS * GALLERY}
    assert (summary(cold), summary(warm)) == (expected, expected)
    assert all(start == b'RIFF' for *_, start in cold + warm)
    assert flooded[503] > 0 and set(flooded) <= {200, 503}     # refused beyond its share, never reset
    assert max(seconds for _, _, seconds, _ in cold) < 15      # measured: 6.5 s, the median 3.2 s (2 CPUs shared)


def test_40_browsers_each_opening_a_1000px_preview_at_once_all_get_it(stack):
    web, nginx = stack
    answers = browsers(nginx.port, [[thumbnail_path(f'preview{i}.jpg', 1000)] for i in range(USERS)])
    assert summary(answers) == {(200, 'image/webp'): USERS}


def test_10_users_uploading_at_once_through_nginx_store_every_byte(stack):
    web, nginx = stack
    files = {f'upload{i}-{secrets.token_hex(4)}.jpg': b'\xff\xd8\xff' + secrets.token_bytes(3 * 1024 ** 2)
             for i in range(10)}
    statuses = {}

    def upload(number, name, data):
        boundary = secrets.token_hex(16)
        fields = {'store': name, 'type': 'O', 'coll': 'Fish', 'token': make_token(STOCK_KEY, name)}
        body = b''.join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode()
                        for field, value in fields.items())
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 f'Content-Type: image/jpeg\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
        statuses[name] = nginx.request('POST', '/fileupload', body, {
            'Content-Type': f'multipart/form-data; boundary={boundary}'}, source=f'127.0.0.{100 + number}')[::2]
    threads = [threading.Thread(target=upload, args=(number, name, data))
               for number, (name, data) in enumerate(files.items())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert statuses == {name: (200, b'Ok.') for name in files}
    for name, data in files.items():
        assert nginx.request('GET', f'/fileget?coll=Fish&type=O&filename={name}')[::2] == (200, data)
        assert (web.base_dir / 'originals' / name).read_bytes() == data


# --- What the README adds to Specify 7's nginx and composition ---------------------------------------------------

def test_the_readmes_location_forwards_the_capabilities_document_through_specify7s_nginx(stack):
    web, nginx = stack
    status, headers, body = nginx.request('GET', '/capabilities.json')
    assert (status, headers['Content-Type'], headers['Access-Control-Allow-Origin']) == (
        200, 'application/json', '*')
    assert json.loads(body)['iiif']['services']['3.0'] == f'http://127.0.0.1:{nginx.port}/iiif/3'


def test_the_readmes_location_forwards_iiif_through_specify7s_nginx(stack):
    web, nginx = stack
    status, _, body = nginx.request('GET', '/iiif/3/sheet0.jpg/info.json')
    assert status == 200
    assert json.loads(body)['id'] == f'http://127.0.0.1:{nginx.port}/iiif/3/sheet0.jpg'
    status, headers, tile = nginx.request('GET', '/iiif/3/sheet0.jpg/0,0,512,512/256,/0/default.jpg')
    assert (status, headers['Content-Type'], tile[:2]) == (200, 'image/jpeg', b'\xff\xd8')


def test_the_discovery_document_through_specify7s_nginx_names_iiif_and_capabilities_at_its_address(stack):
    web, nginx = stack
    status, _, body = nginx.request('GET', '/web_asset_store.xml')
    base = f'http://127.0.0.1:{nginx.port}'
    assert status == 200
    assert re.findall(rb'<url type="(\w+)">([^<]*)</url>', body)[5:] == [
        (b'iiif', f'{base}/iiif/3'.encode()), (b'capabilities', f'{base}/capabilities.json'.encode())]


def specify7_composition(with_snippet):
    """The services of Specify 7's composition that matter here, this image as its asset server, and the
    README's snippet merged in (the long form of depends_on replacing the short one)."""
    document = {'services': {
        'mariadb': {'image': 'mariadb:10.11'},
        'asset-server': {'image': 'specify-web-asset-server:1.1.0', 'init': True,
                         'volumes': ['attachments:/home/specify/attachments'],
                         'environment': ['SERVER_NAME=host.docker.internal', 'SERVER_PORT=80',
                                         'ATTACHMENT_KEY=your asset server access key', 'DEBUG_MODE=false']},
        'specify7': {'image': 'specifyconsortium/specify7-service:v7.9', 'depends_on': ['mariadb']},
        'specify7-worker': {'image': 'specifyconsortium/specify7-service:v7.9', 'depends_on': ['mariadb']},
        'nginx': {'image': 'nginx:alpine', 'ports': ['80:80']}},
        'volumes': {'attachments': None}}
    if with_snippet:
        for name, service in yaml.safe_load(readme_block('yaml', 'service_healthy'))['services'].items():
            document['services'][name].update(service)
    return document


def test_the_readmes_compose_snippet_is_valid_in_specify7s_composition(compose_schema):  # noqa: F811
    assert schema_errors(compose_schema, specify7_composition(with_snippet=True)) == []


def test_the_readmes_compose_snippet_makes_both_specify7_services_wait_for_the_healthy_asset_server():
    services = specify7_composition(with_snippet=True)['services']
    for name in ('specify7', 'specify7-worker'):
        assert services[name]['depends_on']['asset-server'] == {'condition': 'service_healthy'}
        assert 'mariadb' in services[name]['depends_on']        # what they waited for before, kept


def test_the_image_the_snippet_waits_for_has_a_health_check():
    with open(os.path.join(PROJECT, 'Dockerfile')) as f:
        assert re.search(r'^HEALTHCHECK .*/health', f.read(), re.M | re.S)
