"""What clients can learn of the server: the capabilities document and the discovery document's new entries,
read the way Specify 6 and Specify 7 read the discovery document (facts from their code: Specify 6's
WebStoreAttachmentMgr walks the root's `url` children, calls `attributeValue("type").equals(...)` for the types
it knows and trims the text, and needs read, write and delete; Specify 7's attachment_gw parses with
ElementTree, maps `url.attrib['type']` to `url.text` and merges that map into the settings it hands the
browser beside its own keys `collection` and `token_required_for_get`)."""

import functools
import json
import threading
import xml.etree.ElementTree as ET
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.browser import launch_chromium
from harness.client import KEY
from harness.servers import RunningServer
from config import VERSION

SPECIFY6_TYPES = ('read', 'write', 'delete', 'fileget', 'getmetadata', 'testkey')
SPECIFY7_SETTINGS = ('collection', 'token_required_for_get')


def capabilities(client):
    answer = client.get('/capabilities.json', {})
    assert answer.content_type == 'application/json'
    return json.loads(answer.body)


# --- The capabilities document ------------------------------------------------------------------------------

def test_capabilities_name_the_server_and_its_version(client):
    assert {key: capabilities(client)[key] for key in ('server', 'version')} == {
        'server': 'Web Asset Server for Specify', 'version': VERSION}


def test_capabilities_give_the_largest_upload_accepted(make_client):
    assert capabilities(make_client(MAX_UPLOAD_SIZE=5 * 1024 ** 2))['maxUploadBytes'] == 5 * 1024 ** 2


def test_capabilities_give_the_types_that_get_thumbnails_and_their_bounds(make_client):
    client = make_client(CAN_THUMBNAIL=['image/png', 'image/jpeg'], MAX_THUMBNAIL_SCALE=800,
                         PREGENERATE_SCALE=[500, 123], WEBP_THUMBNAILS=False)
    assert capabilities(client)['thumbnails'] == {'types': ['image/jpeg', 'image/png'], 'maxScale': 800,
                                                  'pregeneratedScales': [500, 123], 'webp': False}


def test_capabilities_leave_out_pdf_thumbnails_when_ghostscript_is_missing(make_client):
    client = make_client(GHOSTSCRIPT='/nonexistent/gs')
    assert 'application/pdf' not in capabilities(client)['thumbnails']['types']
    assert 'application/pdf' not in capabilities(client)['iiif']['types']


@pytest.mark.parametrize('required', [False, True])
def test_capabilities_say_whether_reads_need_a_token(make_client, required):
    assert capabilities(make_client(REQUIRE_KEY_FOR_GET=required))['tokenRequiredForGet'] is required


def test_capabilities_give_the_iiif_versions_their_services_at_the_public_address_and_the_largest_size(make_client):
    iiif = capabilities(make_client(PUBLIC_SCHEME='https', SERVER_PORT=443, IIIF_MAX_SIZE=2048))['iiif']
    assert (iiif['versions'], iiif['services'], iiif['maxSize']) == (
        ['2.1', '3.0'], {'2.1': 'https://assets.example.org/iiif/2', '3.0': 'https://assets.example.org/iiif/3'}, 2048)


def test_capabilities_name_no_collection(make_client):
    client = make_client(COLLECTION_DIRS={'Secret Herbarium': 'herb'})
    assert 'Secret' not in client.get('/capabilities.json', {}).text and 'herb' not in \
        client.get('/capabilities.json', {}).text


def test_capabilities_need_no_token_even_when_reads_do(make_client):
    assert make_client(REQUIRE_KEY_FOR_GET=True).get('/capabilities.json', {}).status_int == 200


# --- The discovery document as each client reads it ----------------------------------------------------------

def discovery(client):
    return ET.fromstring(client.get('/web_asset_store.xml', {}).body)


def as_specify6_reads_it(root):
    """The URLs Specify 6 keeps: each `url` child's trimmed text under the types it knows (any other ignored)."""
    kept = {}
    for url in root.findall('url'):
        kind = url.get('type')
        assert kind is not None, 'Specify 6 calls equals() on the type: a url without one is a NullPointerException'
        if kind in SPECIFY6_TYPES:
            kept[kind] = (url.text or '').strip()
    assert all(kept.get(kind) for kind in ('read', 'write', 'delete')), 'Specify 6 refuses the document'
    return kept


def as_specify7_reads_it(root):
    """The settings Specify 7 hands the browser: its own keys, then every url's type mapped to its text."""
    settings = {'collection': 'Fish', 'token_required_for_get': False}
    settings.update({url.attrib['type']: url.text for url in root.findall('url')})
    return settings


def test_specify6_keeps_exactly_the_classic_urls_from_the_new_document(client):
    assert as_specify6_reads_it(discovery(client)) == {
        kind: f'http://assets.example.org:8080/{path}' for kind, path in [
            ('read', 'fileget'), ('write', 'fileupload'), ('delete', 'filedelete'),
            ('getmetadata', 'getmetadata'), ('testkey', 'testkey')]}


def test_specify7_hands_the_browser_the_iiif_and_capabilities_urls_beside_its_own_settings(client):
    settings = as_specify7_reads_it(discovery(client))
    assert (settings['collection'], settings['token_required_for_get']) == ('Fish', False)
    assert (settings['iiif'], settings['capabilities']) == (
        'http://assets.example.org:8080/iiif/3', 'http://assets.example.org:8080/capabilities.json')


def test_no_discovery_type_is_one_specify6_reads_differently_or_that_overwrites_a_specify7_setting(client):
    types = [url.get('type') for url in discovery(client).findall('url')]
    assert len(types) == len(set(types))
    assert 'fileget' not in types                     # Specify 6 would take it for its own fileget URL
    assert not set(types) & set(SPECIFY7_SETTINGS)


# --- Read from another origin by a real browser ------------------------------------------------------------------

class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_browser_page_on_another_origin_reads_the_capabilities_document(tmp_path):
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'index.html').write_text('<!doctype html><title>portal</title>')
    pages = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietFiles, directory=str(tmp_path / 'site')))
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    web = RunningServer(tmp_path / 'attachments', tmp_path / 'server.log', REQUIRE_KEY_FOR_GET='true')
    from playwright.sync_api import sync_playwright
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.goto(f'http://localhost:{pages.server_address[1]}/index.html')
            read = page.evaluate('url => fetch(url).then(answer => answer.json())',
                                 f'http://127.0.0.1:{web.port}/capabilities.json')
            browser.close()
    finally:
        web.stop()
        pages.shutdown()
        pages.server_close()
    assert (read['tokenRequiredForGet'], read['iiif']['services']['3.0']) == (
        True, f'http://127.0.0.1:{web.port}/iiif/3')
    assert KEY not in json.dumps(read)
