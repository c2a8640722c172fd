"""Real IIIF viewers in a real browser: OpenSeadragon and Leaflet-IIIF, fetched pinned from npm, open an image
of the running server in headless Chromium and zoom into it; with REQUIRE_KEY_FOR_GET they need a token.
Mirador opens the image's manifest by its URL."""

import base64
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlencode

import pytest

from harness.browser import launch_chromium
from harness.client import KEY, multipart_body
from harness.images import IMAGEMAGICK, make_image
from harness.servers import RunningServer
from tokens import make_token

HERE = pathlib.Path(__file__).parent
CACHE = HERE / '.cache' / 'viewers'
PACKAGES = [     # name, version, npm's integrity of its tarball, {file in the tarball: name served next to the pages}
    ('openseadragon', '6.1.1',
     'sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw==',
     {'package/build/openseadragon/openseadragon.min.js': 'openseadragon.min.js'}),
    ('leaflet', '1.9.4',
     'sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+FA74PA==',
     {'package/dist/leaflet.js': 'leaflet.js', 'package/dist/leaflet.css': 'leaflet.css'}),
    ('leaflet-iiif', '3.0.0',
     'sha512-WWejon+vWaJUPe4Lp/AidYMosyy82bU/OjVgHQCTUojFWaUxzs00Ao6pSd42EYw45S8SW2Drc4VsMb3sxSNUMQ==',
     {'package/leaflet-iiif.js': 'leaflet-iiif.js'}),
    ('mirador', '3.4.3',
     'sha512-yHoug0MHy4e9apykbbBhK+4CmbZS94zMxmugw2E2VX6iB0b2PKKY0JfYr/QfXh9P29YnWAbymaXJVpgbHVpTVw==',
     {'package/dist/mirador.min.js': 'mirador.min.js'}),
]
NAME = 'herbarium sheet.jpg'
WIDTH, HEIGHT = 3000, 2000       # tiles at scale factors 1, 2, 4 and 8
WAIT_MS = 30_000                 # for one view's tiles: each is still cut from the decoded original
TILE = re.compile(r'/(full|\d+,\d+,(\d+),\d+)/(\d+),\d*/0/default\.jpg$')
IMAGE_SHOWN = 1000               # distinct colours: the plasma image has tens of thousands, a blank viewer one


# --- The viewers, from npm -------------------------------------------------------------------

def npm_integrity(data):
    return 'sha512-' + base64.b64encode(hashlib.sha512(data).digest()).decode()


def packed(name, version, integrity):
    """The package's tarball, fetched with `npm pack` into tests/.cache/viewers unless kept there, and
    checked against its pinned integrity."""
    tarball = CACHE / f'{name}-{version}.tgz'
    if not tarball.exists() or npm_integrity(tarball.read_bytes()) != integrity:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(['npm', 'pack', f'{name}@{version}', '--pack-destination', str(CACHE), '--silent'],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=300,
                       env=dict(os.environ, npm_config_update_notifier='false', npm_config_fund='false'))
        assert npm_integrity(tarball.read_bytes()) == integrity, f'{tarball.name} is not the pinned tarball'
    return tarball


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The test pages and the viewers' files, served from a folder on another loopback origin than the server's."""
    folder = tmp_path_factory.mktemp('site')
    for page in (HERE / 'viewers').glob('*.html'):
        shutil.copy(page, folder)
    for name, version, integrity, files in PACKAGES:
        with tarfile.open(packed(name, version, integrity)) as archive:
            for member, served in files.items():
                (folder / served).write_bytes(archive.extractfile(member).read())
    pages = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietFiles, directory=str(folder)))
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    yield f'http://localhost:{pages.server_address[1]}'
    pages.shutdown()
    pages.server_close()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


# --- The server, with one large image ------------------------------------------------------------

@pytest.fixture(scope='module')
def sheet(tmp_path_factory):
    """A 3000x2000 JPEG (plasma made small and enlarged: quick to make, still many colours at every scale)."""
    return make_image(tmp_path_factory.mktemp('sheet'), 'plasma:', '750x500', 'jpg', '-resize', f'{WIDTH}x{HEIGHT}!')


def serving(folder, sheet, **settings):
    """The real server on a free loopback port, the sheet uploaded to it as Specify does."""
    web = RunningServer(folder / 'attachments', folder / 'server.log', **settings)
    content_type, body = multipart_body([('file', 'blob', sheet), ('store', NAME), ('type', 'O'), ('coll', 'Fish'),
                                         ('token', make_token(KEY, NAME))])
    assert web.request('POST', '/fileupload', body, {'Content-Type': content_type})[0] == 200
    web.url = f'http://127.0.0.1:{web.port}'
    return web


@pytest.fixture(scope='module')
def open_server(tmp_path_factory, sheet):
    web = serving(tmp_path_factory.mktemp('open'), sheet)
    yield web
    web.stop()


@pytest.fixture(scope='module')
def keyed_server(tmp_path_factory, sheet):
    web = serving(tmp_path_factory.mktemp('keyed'), sheet, REQUIRE_KEY_FOR_GET='true')
    yield web
    web.stop()


def info_url(web, token=None):
    return f'{web.url}/iiif/3/{quote(NAME)}/info.json' + (f'?token={quote(token)}' if token else '')


# --- Driving a viewer ------------------------------------------------------------------------------

class Viewing:
    """One test page in a fresh browser context (nothing cached), with every request it made and answer it received."""

    def __init__(self, browser, site, page, url):
        self.kind = page
        self.context = browser.new_context(viewport={'width': 1000, 'height': 800})
        self.page = self.context.new_page()
        self.requested, self.answers = [], []
        self.page.on('request', lambda request: self.requested.append(request.url))
        self.page.on('response', lambda answer: self.answers.append((answer.url, answer.status)))
        self.page.goto(f'{site}/{page}.html?' + urlencode({'manifest' if page == 'mirador' else 'info': url}))

    def tiles(self):
        """(url, status) of every image request the viewer made so far."""
        return [(url, status) for url, status in self.answers if TILE.search(url)]

    def tiles_arrived(self):
        """Wait until the viewer has had its first tile, for a page that counts no views (Mirador)."""
        self.page.wait_for_function('tile => performance.getEntriesByType("resource").some('
                                    'entry => new RegExp(tile).test(entry.name))', arg=TILE.pattern, timeout=WAIT_MS)

    def info_statuses(self):
        return [status for url, status in self.answers if url.split('?')[0].endswith('/info.json')]

    def views_loaded(self, count):
        """Wait until the viewer has had every tile of its view `count` times in all (once opened, once zoomed)."""
        self.page.wait_for_function(f'views >= {count}', timeout=WAIT_MS)

    def settled(self):
        """True once the viewer read a usable info.json, False once it gave up; then wait for the network to rest."""
        usable = self.page.evaluate('opened' if self.kind == 'osd' else 'described')
        self.page.wait_for_load_state('networkidle', timeout=WAIT_MS)
        return usable

    def colours(self):
        """Distinct colours the viewer shows: OpenSeadragon's canvas (Mirador's too) read in the page (its failure
        message is drawn over it, not on it); Leaflet's map as the screen shows it."""
        if self.kind != 'leaflet':
            return self.page.evaluate('colours()')
        shot = self.page.locator('#map').screenshot()
        return int(subprocess.run([IMAGEMAGICK, 'png:-', '-format', '%k', 'info:'], input=shot, check=True,
                                  capture_output=True, timeout=60).stdout)

    def close(self):
        self.context.close()


@pytest.fixture
def view(browser, site):
    """Open a viewer page: view('osd' or 'leaflet', info URL) or view('mirador', manifest URL)."""
    opened = []

    def open_page(page, url):
        opened.append(Viewing(browser, site, page, url))
        return opened[-1]
    yield open_page
    for viewing in opened:
        viewing.close()


def scale_factors(tiles):
    """Each tile request's scale factor: the width of its region over the width asked for."""
    factors = []
    for url, _status in tiles:
        region, region_width, size_width = TILE.search(url).groups()
        factors.append((WIDTH if region == 'full' else int(region_width)) / int(size_width))
    return factors


def zoomed_in(viewing):
    """The tiles the viewer asked for once zoomed in to full resolution, and those it had asked for before."""
    viewing.views_loaded(1)
    before = viewing.tiles()
    loaded = viewing.page.evaluate('(zoomIn(), views)')
    viewing.views_loaded(loaded + 1)
    return viewing.tiles()[len(before):], before


# --- Without REQUIRE_KEY_FOR_GET -----------------------------------------------------------------

@pytest.mark.parametrize('page', ['osd', 'leaflet'])
def test_the_viewer_shows_the_image_from_tiles_answered_200(view, open_server, page):
    viewing = view(page, info_url(open_server))
    assert viewing.settled() is True
    viewing.views_loaded(1)
    assert viewing.tiles() and {status for _url, status in viewing.tiles()} == {200}
    assert viewing.colours() > IMAGE_SHOWN


@pytest.mark.parametrize('page', ['osd', 'leaflet'])
def test_zooming_in_loads_tiles_of_higher_resolution_answered_200(view, open_server, page):
    after, before = zoomed_in(view(page, info_url(open_server)))
    assert after and {status for _url, status in after} == {200}
    assert min(scale_factors(after)) == 1 < min(scale_factors(before))


def test_mirador_opens_the_manifest_by_url_and_shows_the_image_from_its_service(view, site, open_server):
    """Mirador reads the manifest, then the image service's info.json and tiles, asking nothing beyond the two
    loopback origins (its bundle needs no network)."""
    manifest = f'{open_server.url}/iiif/3/{quote(NAME)}/manifest'
    viewing = view('mirador', manifest)
    viewing.tiles_arrived()
    viewing.page.wait_for_load_state('networkidle', timeout=WAIT_MS)
    assert (manifest, 200) in viewing.answers
    assert viewing.info_statuses() and set(viewing.info_statuses()) == {200}
    assert viewing.tiles() and {status for _url, status in viewing.tiles()} == {200}
    assert {status for url, status in viewing.answers if url.startswith(open_server.url)} == {200}
    assert all(url.startswith((site, open_server.url)) for url in viewing.requested)
    assert viewing.colours() > IMAGE_SHOWN


# --- With REQUIRE_KEY_FOR_GET ----------------------------------------------------------------------

def test_openseadragon_given_info_json_with_a_token_zooms_in_through_the_grant(view, keyed_server):
    viewing = view('osd', info_url(keyed_server, make_token(KEY, NAME)))
    assert viewing.settled() is True
    after, before = zoomed_in(viewing)
    assert {status for _url, status in before + after} == {200} and min(scale_factors(after)) == 1
    assert all(url.startswith(f'{keyed_server.url}/iiif/grant/') for url, _status in before + after)
    assert viewing.colours() > IMAGE_SHOWN


def test_leaflet_given_the_identifier_with_a_token_zooms_in_through_the_grant(view, keyed_server):
    """The page follows the bare identifier's 303 to the granted info.json: Leaflet-IIIF makes tile URLs from
    the info.json URL it is given, not from the id inside it."""
    token = make_token(KEY, NAME)
    viewing = view('leaflet', f'{keyed_server.url}/iiif/3/{quote(NAME)}?token={quote(token)}')
    assert viewing.settled() is True
    after, before = zoomed_in(viewing)
    assert {status for _url, status in before + after} == {200} and min(scale_factors(after)) == 1
    assert all(url.startswith(f'{keyed_server.url}/iiif/grant/') for url, _status in before + after)
    assert viewing.colours() > IMAGE_SHOWN


@pytest.mark.parametrize('page', ['osd', 'leaflet'])
def test_without_a_token_the_viewer_shows_nothing(view, keyed_server, page):
    viewing = view(page, info_url(keyed_server))
    assert viewing.settled() is False
    assert viewing.info_statuses() == [403]
    assert 200 not in {status for _url, status in viewing.tiles()}
    assert viewing.colours() == 1
