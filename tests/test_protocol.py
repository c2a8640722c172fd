"""PROTOCOL.md, line by line: what Specify 6, Specify 7 and the web portal rely on."""

import email.utils
import hashlib
import hmac
import io
import json
import os
import time
import xml.etree.ElementTree as ET
from urllib.parse import quote

import pytest

from harness.client import KEY, multipart_body
from harness.images import image_info, make_image, with_exif
from names import TEMP_PREFIX
from tokens import make_token


# --- Clock and tokens -----------------------------------------------------------

def test_token_is_hex_hmac_md5_of_timestamp_then_name_with_timestamp_after_colon():
    expected = hmac.new(KEY.encode(), '1700000000sp6123.att.jpg'.encode(), hashlib.md5).hexdigest()
    assert make_token(KEY, 'sp6123.att.jpg', 1700000000) == f'{expected}:1700000000'


def test_token_over_unicode_name_signs_its_utf8_bytes(client, jpeg):
    name = 'Käfer.jpg'
    ts = int(time.time())
    digest = hmac.new(KEY.encode(), f'{ts}{name}'.encode('utf-8'), hashlib.md5).hexdigest()
    assert client.upload(name, jpeg, token=f'{digest}:{ts}').text == 'Ok.'


def test_testkey_accepts_a_token_signed_over_random(client):
    answer = client.get('/testkey', {'random': '42', 'token': client.token('42')})
    assert (answer.status_int, answer.text) == (200, 'Ok.')


def test_testkey_refuses_a_token_signed_with_another_key(client):
    token = make_token('some other key', '42')
    assert client.get('/testkey', {'random': '42', 'token': token}, status=403).status_int == 403


def test_testkey_accepts_a_negative_number_as_random(client):
    assert client.get('/testkey', {'random': '-8123', 'token': client.token('-8123')}).text == 'Ok.'


def test_testkey_accepts_any_text_as_random(client):
    random = 'ünïcode & spaces?'
    assert client.get('/testkey', {'random': random, 'token': client.token(random)}).text == 'Ok.'


MINTED = 1700000000          # a token's timestamp, for tests that set when the request started
WINDOWS = {'default 150 s': ({}, 150), 'TIME_TOLERANCE=10': ({'TIME_TOLERANCE': 10}, 10)}


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('side', [-1, 1], ids=['token from the past', 'token from the future'])
def test_token_less_than_time_tolerance_from_the_request_start_is_accepted(make_client, window, side):
    settings, tolerance = WINDOWS[window]
    client = make_client(**settings)
    client.app.clock = lambda: MINTED - side * (tolerance - 0.001)
    answer = client.get('/testkey', {'random': '7', 'token': client.token('7', MINTED)})
    assert (answer.status_int, answer.text) == (200, 'Ok.')


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('side', [-1, 1], ids=['token from the past', 'token from the future'])
def test_token_exactly_time_tolerance_from_the_request_start_is_refused(make_client, window, side):
    settings, tolerance = WINDOWS[window]
    client = make_client(**settings)
    client.app.clock = lambda: MINTED - side * tolerance
    answer = client.get('/testkey', {'random': '7', 'token': client.token('7', MINTED)}, status=403)
    assert 'expired' in answer.text


@pytest.mark.parametrize('offset', [-100000, 100000])
def test_token_a_day_off_the_server_clock_is_refused(client, offset):
    token = client.token('7', int(time.time()) + offset)
    answer = client.get('/testkey', {'random': '7', 'token': token}, status=403)
    assert 'expired' in answer.text


def test_time_tolerance_none_turns_the_window_off(make_client):
    client = make_client(TIME_TOLERANCE=None, NO_TIME_WINDOW_ACKNOWLEDGED=True)
    token = client.token('7', int(time.time()) - 100000)
    assert client.get('/testkey', {'random': '7', 'token': token}).status_int == 200


@pytest.mark.parametrize('token', ['', 'nocolon', ':1700000000', 'abc:', 'abc:12x', 'abc:1.5',
                                   'é:1', 'a' * 5000 + ':1', '::::', 'abc:99999999999999999999999'])
def test_malformed_tokens_are_refused_with_403_never_500(client, token):
    answer = client.get('/testkey', {'random': '1', 'token': token}, status=403)
    assert answer.content_type == 'text/plain'


def test_testkey_without_token_is_403(client):
    client.get('/testkey', {'random': '1'}, status=403)


def test_a_token_for_one_file_does_not_delete_another(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.delete('a.jpg', token=client.token('b.jpg'), status=403)
    assert 'originals/a.jpg' in client.all_files()


def test_auth_disabled_lets_specify6_send_an_empty_token(make_client, jpeg):
    client = make_client(KEY=None, AUTH_DISABLED=True)
    assert client.upload('a.jpg', jpeg, style=6, token='').text == 'Ok.'
    assert client.get('/testkey', {'random': '1', 'token': ''}).text == 'Ok.'
    assert client.delete('a.jpg', token='').text == 'Ok.'


def test_reads_need_no_token_when_require_key_for_get_is_off(client, jpeg):
    client.upload('a.jpg', jpeg)
    assert client.fileget('a.jpg').body == jpeg
    assert client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'json'}).status_int == 200


@pytest.mark.parametrize('path', ['/fileget', '/getmetadata'])
def test_reads_need_a_token_when_require_key_for_get_is_on(make_client, jpeg, path):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg)
    params = {'filename': 'a.jpg', 'type': 'O', 'coll': 'Fish', 'dt': 'json'}
    client.get(path, params, status=403)
    assert client.get(path, dict(params, token=client.token('a.jpg'))).status_int == 200


def test_uploads_always_need_a_token(client, jpeg):
    client.upload('a.jpg', jpeg, token='', status=403)
    assert client.all_files() == set()


def test_deletes_always_need_a_token(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.delete('a.jpg', token='', status=403)
    assert 'originals/a.jpg' in client.all_files()


def test_token_age_is_judged_when_the_request_started_not_when_the_body_arrived(make_client, jpeg):
    client = make_client(TIME_TOLERANCE=2)
    now = [MINTED]
    client.app.clock = lambda: now[0]
    content_type, body = multipart_body([('file', 'x.jpg', jpeg), ('store', 'slow.jpg'), ('type', 'O'),
                                         ('coll', 'Fish'), ('token', client.token('slow.jpg', MINTED))])

    class SlowLine(io.BytesIO):
        def read(self, size=-1):
            now[0] += 1              # each piece takes a second: five pieces at least, the token's 2 s pass
            return super().read(min(size, len(body) // 5 + 1) if size and size > 0 else size)

    answer = client.post_raw('/fileupload', content_type,
                             extra_environ={'wsgi.input': SlowLine(body), 'CONTENT_LENGTH': str(len(body))})
    assert answer.text == 'Ok.'
    assert now[0] >= MINTED + 5          # the body did take longer than the window to arrive


def _x_timestamp_requests(client, jpeg):
    client.upload('a.jpg', jpeg)
    return {
        '200 discovery': lambda: client.get('/web_asset_store.xml', {}),
        '200 file': lambda: client.fileget('a.jpg'),
        '304': lambda: client.fileget('a.jpg', status=304, headers={
            'If-Modified-Since': email.utils.formatdate(time.time() + 60, usegmt=True)}),
        '400': lambda: client.fileget('../a.jpg', status=400),
        '403': lambda: client.get('/testkey', {'random': '1', 'token': 'x:1'}, status=403),
        '404 file': lambda: client.fileget('missing.jpg', status=404),
        '404 route': lambda: client.get('/nowhere', {}, status=404),
        '405': lambda: client.web.put('/fileget', status=405),
        '413': lambda: client.post_raw('/fileupload', 'multipart/form-data; boundary=b', status=413,
                                       extra_environ={'CONTENT_LENGTH': str(10 ** 12)}),
    }


@pytest.mark.parametrize('case', ['200 discovery', '200 file', '304', '400', '403', '404 file',
                                  '404 route', '405', '413'])
def test_every_response_carries_x_timestamp(client, jpeg, case):
    request = _x_timestamp_requests(client, jpeg)[case]
    before = int(time.time())
    answer = request()
    assert before <= int(answer.headers['X-Timestamp']) <= time.time()


def test_a_server_fault_is_a_plain_500_with_x_timestamp_and_no_traceback(client, monkeypatch, jpeg):
    client.upload('a.jpg', jpeg)

    def broken(*args):
        raise RuntimeError('disk controller exploded at /srv/secret/path')
    monkeypatch.setattr(client.app.storage, 'delete', broken)
    monkeypatch.setattr(client.app.storage, 'trash', broken)          # a delete goes into the trash
    answer = client.delete('a.jpg', status=500)
    assert 'X-Timestamp' in answer.headers
    assert answer.text == 'Internal server error.'
    assert 'Traceback' in answer.errors and '/srv/secret/path' in answer.errors


# --- Requests in general ----------------------------------------------------------

def test_html_escaped_query_string_is_read_as_plain(client, jpeg):
    client.upload('a.jpg', jpeg)
    answer = client.web.get('/fileget?filename=a.jpg&amp;coll=Fish&amp;type=O')
    assert answer.body == jpeg


def test_double_escaped_query_string_is_read_as_plain(client, jpeg):
    client.upload('a.jpg', jpeg)
    assert client.web.get('/fileget?filename=a.jpg&amp;amp;type=O').body == jpeg


def test_parameters_the_server_does_not_use_are_ignored(client, jpeg):
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg', scale='null', disp='Fishes', div='Zoology', inst='Museum', dt='json')
    assert answer.body == jpeg


# --- Discovery --------------------------------------------------------------------

def discovered_urls(answer):
    return {url.get('type'): url.text for url in ET.fromstring(answer.body).iter('url')}


def test_discovery_lists_each_endpoint_as_an_absolute_url(client):
    urls = discovered_urls(client.get('/web_asset_store.xml', {}))
    assert urls == {kind: f'http://assets.example.org:8080/{path}' for kind, path in [
        ('read', 'fileget'), ('write', 'fileupload'), ('delete', 'filedelete'),
        ('getmetadata', 'getmetadata'), ('testkey', 'testkey'),
        ('iiif', 'iiif/3'), ('capabilities', 'capabilities.json')]}


def test_discovery_keeps_the_five_classic_entries_first_and_in_their_order(client):
    answer = client.get('/web_asset_store.xml', {})
    assert [url.get('type') for url in ET.fromstring(answer.body).iter('url')][:5] == [
        'read', 'write', 'delete', 'getmetadata', 'testkey']


def test_discovery_is_text_xml(client):
    assert client.get('/web_asset_store.xml', {}).content_type == 'text/xml'


def test_discovery_endpoints_are_siblings_of_the_document(client):
    document = 'http://assets.example.org:8080/web_asset_store.xml'
    prefix = document[:-len('/web_asset_store.xml')]
    for kind, url in discovered_urls(client.get('/web_asset_store.xml', {})).items():
        assert url.rsplit('/', 2 if kind == 'iiif' else 1)[0] == prefix


def test_discovery_leaves_out_the_scheme_default_port_and_says_https_when_set(make_client):
    client = make_client(PUBLIC_SCHEME='https', SERVER_PORT=443)
    assert discovered_urls(client.get('/web_asset_store.xml', {}))['read'] == 'https://assets.example.org/fileget'


def test_discovery_follows_forwarded_headers_from_a_trusted_proxy(make_client):
    client = make_client(TRUST_PROXY_HEADERS=True)
    answer = client.get('/web_asset_store.xml', {}, headers={
        'X-Forwarded-Proto': 'https', 'X-Forwarded-Host': 'specify.museum.org'})
    assert discovered_urls(answer)['write'] == 'https://specify.museum.org/fileupload'


def test_discovery_ignores_forwarded_headers_unless_the_proxy_is_trusted(client):
    answer = client.get('/web_asset_store.xml', {}, headers={
        'X-Forwarded-Proto': 'https', 'X-Forwarded-Host': 'evil.example.com'})
    assert discovered_urls(answer)['read'] == 'http://assets.example.org:8080/fileget'


def test_discovery_escapes_the_server_name_as_xml(make_client):
    client = make_client(SERVER_NAME='a&b')
    assert discovered_urls(client.get('/web_asset_store.xml', {}))['read'] == 'http://a&b:8080/fileget'


# --- Upload -------------------------------------------------------------------------

def test_specify7_upload_with_file_part_first_stores_the_file(client, jpeg):
    answer = client.upload('0b0e7f3c-4a3e-4e8e-9a55-2f8c1d3e6a11.jpg', jpeg, style=7)
    assert (answer.status_int, answer.content_type, answer.text) == (200, 'text/plain', 'Ok.')
    assert client.stored('originals/0b0e7f3c-4a3e-4e8e-9a55-2f8c1d3e6a11.jpg') == jpeg


def test_specify6_upload_with_fields_first_and_file_part_named_after_the_file_stores_it(client, jpeg):
    assert client.upload('sp61234567890123.att.JPG', jpeg, style=6).text == 'Ok.'
    assert client.stored('originals/sp61234567890123.att.JPG') == jpeg


def specify6_body(fields, local_name, data, charset='ISO-8859-1'):
    """multipart/form-data as Specify 6's HTTP library writes it: every text part declares its charset and
    is written in it, the file part comes last (application/octet-stream, binary)."""
    boundary = 'eB8KMq9wIXtGFz5iCNPsYZLFc0F4cxQZ'
    chunks = [(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
               f'Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n').encode()
              + value.encode('latin-1') + b'\r\n' for name, value in fields]
    chunks.append((f'--{boundary}\r\nContent-Disposition: form-data; name="{local_name}"; filename="{local_name}"\r\n'
                   'Content-Type: application/octet-stream; charset=ISO-8859-1\r\n'
                   'Content-Transfer-Encoding: binary\r\n\r\n').encode() + data + b'\r\n')
    chunks.append(f'--{boundary}--\r\n'.encode())
    return f'multipart/form-data; boundary={boundary}', b''.join(chunks)


def specify6_fields(client, store, coll):
    return [('store', store), ('type', 'O'), ('coll', coll), ('token', client.token(store)),
            ('disp', 'Ictiología'), ('div', 'Zoología'), ('inst', 'Museo')]


def test_specify6_text_parts_in_iso_8859_1_are_read_by_the_charset_they_declare(make_client, jpeg):
    client = make_client(COLLECTION_DIRS={'Colección Peces': 'peces'})
    content_type, body = specify6_body(specify6_fields(client, 'sp6123.att.jpg', 'Colección Peces'), 'foto.jpg', jpeg)
    assert client.post_raw('/fileupload', content_type, body).text == 'Ok.'
    assert client.stored('peces/originals/sp6123.att.jpg') == jpeg


@pytest.mark.parametrize('charset', ['x-no-such-charset', 'hex', 'idna', 'punycode', 'a' * 1000])
def test_an_upload_text_part_in_a_charset_the_server_cannot_read_is_400_and_keeps_nothing(client, jpeg, charset):
    content_type, body = specify6_body(specify6_fields(client, 'sp6123.att.jpg', 'Fish'), 'foto.jpg', jpeg,
                                       charset=charset)
    answer = client.post_raw('/fileupload', content_type, body, status=400)
    assert answer.text == 'A text part of the upload declares a charset this server cannot read.'
    assert client.all_files() == set()


def test_store_name_without_extension_is_kept_as_is(client, jpeg):
    client.upload('0b0e7f3c-4a3e-4e8e-9a55-2f8c1d3e6a11', jpeg)
    assert client.all_files() == {'originals/0b0e7f3c-4a3e-4e8e-9a55-2f8c1d3e6a11'}


def test_thumbnail_upload_is_answered_and_ignored(client, jpeg):
    answer = client.upload('sp6123.att.jpg', jpeg, style=6, kind='T')
    assert answer.text == 'Ignoring thumbnail upload!'
    assert client.all_files() == set()


def test_reupload_replaces_the_bytes(client, jpeg, png):
    client.upload('a.jpg', jpeg)
    client.upload('a.jpg', png)
    assert client.fileget('a.jpg').body == png


def test_reupload_drops_thumbnails_of_the_old_bytes(client, jpeg, png, tmp_path):
    client.upload('a.jpg', jpeg)
    assert image_info(client.fileget('a.jpg', 'T', scale='123').body, tmp_path)[1:] == (123, 82)
    client.upload('a.jpg', png)
    assert client.all_files() == {'originals/a.jpg'}
    assert image_info(client.fileget('a.jpg', 'T', scale='123').body, tmp_path)[1:] == (80, 60)


def test_options_preflight_allows_any_origin(client):
    answer = client.web.options('/fileupload', headers={
        'Origin': 'https://specify.museum.org', 'Access-Control-Request-Method': 'POST',
        'Access-Control-Request-Headers': 'x-requested-with'})
    assert answer.status_int == 200
    assert answer.headers['Access-Control-Allow-Origin'] == '*'
    assert 'POST' in answer.headers['Access-Control-Allow-Methods']
    assert answer.headers['Access-Control-Allow-Headers'] == 'x-requested-with'


@pytest.mark.parametrize('case', ['ok', 'bad token', 'bad name', 'too large'])
def test_upload_answers_carry_cors_on_success_and_on_every_error(make_client, jpeg, case):
    client = make_client(MAX_UPLOAD_SIZE=len(jpeg) + 2000)
    answer = {
        'ok': lambda: client.upload('a.jpg', jpeg),
        'bad token': lambda: client.upload('a.jpg', jpeg, token='0:0', status=403),
        'bad name': lambda: client.upload('../a.jpg', jpeg, status=400),
        'too large': lambda: client.upload('a.jpg', jpeg * 2, status=413),
    }[case]()
    assert answer.headers['Access-Control-Allow-Origin'] == '*'


@pytest.mark.parametrize('kind', [None, '', 'X', 'o'])
def test_upload_with_missing_or_bad_type_is_400(client, jpeg, kind):
    content_type, body = multipart_body([('file', 'x', jpeg), ('store', 'a.jpg'), ('coll', 'Fish'),
                                         ('token', client.token('a.jpg'))] + ([('type', kind)] if kind is not None else []))
    answer = client.post_raw('/fileupload', content_type, body, status=400)
    assert 'type' in answer.text
    assert client.all_files() == set()


def test_upload_without_a_file_part_is_400(client):
    content_type, body = multipart_body([('store', 'a.jpg'), ('type', 'O'), ('token', client.token('a.jpg'))])
    client.post_raw('/fileupload', content_type, body, status=400)
    assert client.all_files() == set()


def test_upload_with_two_file_parts_is_400_and_keeps_nothing(client, jpeg):
    content_type, body = multipart_body([('a', 'a', jpeg), ('b', 'b', jpeg), ('store', 'a.jpg'),
                                         ('type', 'O'), ('token', client.token('a.jpg'))])
    client.post_raw('/fileupload', content_type, body, status=400)
    assert client.all_files() == set()


def test_upload_that_is_not_multipart_is_400(client):
    client.web.post('/fileupload', {'store': 'a.jpg', 'type': 'O', 'token': client.token('a.jpg')}, status=400)


def test_upload_over_the_size_limit_is_413_without_reading_the_body(make_client):
    client = make_client(MAX_UPLOAD_SIZE=1000)

    class Untouchable(io.BytesIO):
        def read(self, *args):
            raise AssertionError('the body was read')
    answer = client.post_raw('/fileupload', 'multipart/form-data; boundary=x', status=413,
                             extra_environ={'wsgi.input': Untouchable(), 'CONTENT_LENGTH': '5000'})
    assert '1000 bytes' in answer.text


def test_interrupted_upload_is_400_and_leaves_nothing_behind(client, jpeg):
    content_type, body = multipart_body([('store', 'a.jpg'), ('type', 'O'), ('token', client.token('a.jpg')),
                                         ('file', 'a.jpg', jpeg)])
    cut = body[:len(body) // 2]
    client.post_raw('/fileupload', content_type, status=400,
                    extra_environ={'wsgi.input': io.BytesIO(cut), 'CONTENT_LENGTH': str(len(body))})
    assert client.all_files() == set()


def test_temporaries_a_crash_left_in_the_staging_folder_over_an_hour_ago_are_removed_at_start(make_client, tmp_path):
    base = tmp_path / 'attachments'
    base.mkdir()
    for name in ('old.part', 'fresh.part'):
        (base / (TEMP_PREFIX + name)).write_bytes(b'staged')
    (base / (TEMP_PREFIX + 'scratch')).mkdir()
    (base / (TEMP_PREFIX + 'scratch') / 'in').write_bytes(b'staged')
    (base / 'kept.txt').write_bytes(b'not ours')
    two_hours_ago = time.time() - 7200
    for name in (TEMP_PREFIX + 'old.part', TEMP_PREFIX + 'scratch', 'kept.txt'):
        os.utime(base / name, (two_hours_ago, two_hours_ago))
    make_client()
    assert sorted(os.listdir(base)) == [TEMP_PREFIX + 'fresh.part', 'kept.txt']


def test_upload_without_content_length_is_411(client, jpeg):
    content_type, body = multipart_body([('store', 'a.jpg'), ('file', 'a.jpg', jpeg)])
    client.post_raw('/fileupload', content_type, status=411,
                    extra_environ={'wsgi.input': io.BytesIO(body), 'CONTENT_LENGTH': ''})


def test_collection_dirs_put_each_collection_in_its_own_folder(make_client, jpeg):
    client = make_client(COLLECTION_DIRS={'Fish': 'ichthyology', 'Plants': 'herbarium'})
    client.upload('a.jpg', jpeg, coll='Plants')
    assert client.all_files() == {'herbarium/originals/a.jpg'}
    assert client.fileget('a.jpg', coll='Plants').body == jpeg
    client.fileget('a.jpg', coll='Fish', status=404)


def test_unknown_collection_is_404_when_collections_map_to_folders(make_client, jpeg):
    client = make_client(COLLECTION_DIRS={'Fish': 'ichthyology'})
    client.upload('a.jpg', jpeg, coll='Birds', status=404)
    client.fileget('a.jpg', coll='Birds', status=404)
    client.delete('a.jpg', coll='Birds', status=404)
    assert client.all_files() == set()


@pytest.mark.parametrize('coll', ['Fish', '../../etc', 'Herps/Amphibians', '', 'ünï\\code'])
def test_collection_is_ignored_without_collection_dirs(client, jpeg, coll):
    client.upload('a.jpg', jpeg, coll=coll)
    assert client.all_files() == {'originals/a.jpg'}


# --- fileget --------------------------------------------------------------------------

def test_fileget_returns_the_bytes_with_type_length_and_last_modified(client, jpeg):
    before = int(time.time())
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg')
    assert answer.body == jpeg
    assert answer.content_type == 'image/jpeg'
    assert int(answer.headers['Content-Length']) == len(jpeg)
    modified = email.utils.parsedate_to_datetime(answer.headers['Last-Modified']).timestamp()
    assert before <= modified <= time.time()


def test_fileget_head_answers_headers_without_body(client, jpeg):
    client.upload('a.jpg', jpeg)
    answer = client.web.head('/fileget', {'filename': 'a.jpg', 'type': 'O'})
    assert answer.body == b''
    assert int(answer.headers['Content-Length']) == len(jpeg)


def test_fileget_range_answers_206_with_that_slice(client, jpeg):
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg', headers={'Range': 'bytes=100-199'}, status=206)
    assert answer.body == jpeg[100:200]
    assert answer.headers['Content-Range'] == f'bytes 100-199/{len(jpeg)}'


def test_fileget_if_modified_since_answers_304(client, jpeg):
    client.upload('a.jpg', jpeg)
    last_modified = client.fileget('a.jpg').headers['Last-Modified']
    answer = client.fileget('a.jpg', headers={'If-Modified-Since': last_modified}, status=304)
    assert answer.body == b''


def test_fileget_mismatching_if_none_match_wins_over_a_recent_if_modified_since(client, jpeg):
    client.upload('a.jpg', jpeg)
    last_modified = client.fileget('a.jpg').headers['Last-Modified']
    answer = client.fileget('a.jpg', headers={'If-None-Match': '"an-older-version"',
                                              'If-Modified-Since': last_modified}, status=200)
    assert answer.body == jpeg


def test_fileget_if_none_match_listing_the_etag_among_others_answers_304(client, jpeg):
    client.upload('a.jpg', jpeg)
    etag = client.fileget('a.jpg').headers['ETag']
    client.fileget('a.jpg', headers={'If-None-Match': f'"other", {etag} , "more"'}, status=304)


def test_fileget_if_none_match_star_answers_304_for_a_stored_file(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.fileget('a.jpg', headers={'If-None-Match': '*'}, status=304)


def test_fileget_if_none_match_compares_etags_weakly(client, jpeg):
    client.upload('a.jpg', jpeg)
    etag = client.fileget('a.jpg').headers['ETag']
    client.fileget('a.jpg', headers={'If-None-Match': 'W/' + etag}, status=304)


def test_fileget_if_none_match_of_other_etags_answers_the_bytes(client, jpeg):
    client.upload('a.jpg', jpeg)
    assert client.fileget('a.jpg', headers={'If-None-Match': '"other", W/"more"'}, status=200).body == jpeg


def test_fileget_downloadname_gives_an_inline_utf8_content_disposition(client, jpeg):
    client.upload('a.jpg', jpeg)
    name = 'Fisch – Ägypten 鱼 "quoted";.jpg'
    answer = client.fileget('a.jpg', downloadname=name)
    assert answer.headers['Content-Disposition'] == "inline; filename*=utf-8''" + quote(name, safe='')


def test_fileget_content_type_of_a_name_without_extension_comes_from_its_bytes(client, jpeg):
    client.upload('0b0e7f3c', jpeg)
    assert client.fileget('0b0e7f3c').content_type == 'image/jpeg'


def test_fileget_html_is_served_sandboxed_so_it_cannot_run_scripts(client):
    client.upload('page.html', b'<script>alert(1)</script>')
    answer = client.fileget('page.html')
    assert answer.headers['Content-Security-Policy'] == 'sandbox'
    assert answer.headers['X-Content-Type-Options'] == 'nosniff'


def test_fileget_missing_file_is_404(client):
    assert client.fileget('nothing.jpg', status=404).content_type == 'text/plain'


def test_fileget_missing_type_is_400(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.get('/fileget', {'filename': 'a.jpg'}, status=400)


@pytest.mark.parametrize('scale', [123, 256, 200, 500])
def test_thumbnail_longer_side_is_the_scale_bounded_by_the_original(client, tmp_path, scale):
    original = make_image(tmp_path, 'plasma:', '400x300', 'jpg')
    client.upload('a.jpg', original)
    answer = client.fileget('a.jpg', 'T', scale=str(scale))
    kind, width, height = image_info(answer.body, tmp_path)
    assert (answer.content_type, kind) == ('image/jpeg', 'JPEG')
    assert max(width, height) == min(scale, 400)


def test_thumbnail_is_cached_in_the_upstream_layout(client, jpeg):
    client.upload('sp6123.att.jpg', jpeg)
    first = client.fileget('sp6123.att.jpg', 'T', scale='123').body
    assert client.stored('thumbnails/sp6123.att_123.jpg') == first


def test_thumbnail_of_a_file_that_cannot_be_thumbnailed_is_404(client):
    client.upload('notes.txt', b'field notes, not an image')
    answer = client.fileget('notes.txt', 'T', scale='123', status=404)
    assert answer.content_type == 'text/plain'
    assert client.all_files() == {'originals/notes.txt'}


@pytest.mark.parametrize('scale', [None, '', 'abc', '0', '-1', '1.5', '2001', 'null', '1e3',
                                   '99999999999999', ' 123', '١٢٣'])
def test_thumbnail_with_a_bad_scale_is_400_and_creates_nothing(client, jpeg, scale):
    client.upload('a.jpg', jpeg)
    params = {} if scale is None else {'scale': scale}
    answer = client.fileget('a.jpg', 'T', status=400, **params)
    assert 'scale' in answer.text
    assert client.all_files() == {'originals/a.jpg'}


def test_thumbnail_of_a_missing_file_is_404(client):
    client.fileget('nothing.jpg', 'T', scale='123', status=404)


# --- filedelete -------------------------------------------------------------------------

def test_delete_removes_the_original_and_its_thumbnails(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.fileget('a.jpg', 'T', scale='123')
    client.fileget('a.jpg', 'T', scale='256')
    answer = client.delete('a.jpg')
    assert (answer.status_int, answer.text) == (200, 'Ok.')
    assert client.all_files() == set()
    client.fileget('a.jpg', status=404)


@pytest.mark.parametrize('deleted, kept', [('a.jpg', 'a_1.jpg'), ('a_1.jpg', 'a.jpg'),
                                           ('a+b(1).jpg', 'a+bb(1).jpg'), ('a.b.jpg', 'a_b.jpg'),
                                           ('x', 'x_5'), ('[ab].jpg', 'a.jpg')])
def test_delete_never_removes_another_files_thumbnails(client, jpeg, deleted, kept):
    for name in (deleted, kept):
        client.upload(name, jpeg)
        client.fileget(name, 'T', scale='123')
    client.delete(deleted)
    root, ext = os.path.splitext(kept)
    assert client.all_files() == {f'originals/{kept}', f'thumbnails/{root}_123{ext}'}


def test_delete_of_a_missing_file_is_404(client):
    client.delete('nothing.jpg', status=404)


# --- getmetadata ------------------------------------------------------------------------

def test_getmetadata_json_lists_exif_groups_with_fields_as_text(client, jpeg):
    client.upload('a.jpg', with_exif(jpeg, date='2023:04:05 06:07:08'))
    answer = client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'json'})
    groups = {group['Name']: group['Fields'] for group in answer.json}
    assert groups['EXIF']['DateTimeOriginal'] == '2023:04:05 06:07:08'
    assert groups['Image']['Make'] == 'Canon'
    assert groups['GPS']['GPSLatitudeRef'] == 'N'
    assert all(isinstance(value, str) for fields in groups.values() for value in fields.values())


def test_getmetadata_date_answers_date_time_original_as_text(client, jpeg):
    client.upload('a.jpg', with_exif(jpeg, date='2023:04:05 06:07:08'))
    answer = client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'date'})
    assert (answer.content_type, answer.text) == ('text/plain', '2023:04:05 06:07:08')


def test_getmetadata_date_is_404_when_the_file_has_none(client, jpeg):
    client.upload('a.jpg', with_exif(jpeg, date=None))
    client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'date'}, status=404)


@pytest.mark.parametrize('data', [b'plain text notes', b'', b'\xff\xd8\xff\xe1\x00\x10Exif\x00\x00broken'])
def test_getmetadata_of_a_file_without_exif_is_an_empty_list(client, data):
    client.upload('a.jpg', data)
    answer = client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'json'})
    assert (answer.content_type, answer.json) == ('application/json', [])


def test_getmetadata_of_a_missing_file_is_404(client):
    client.get('/getmetadata', {'filename': 'nothing.jpg', 'coll': 'Fish', 'dt': 'json'}, status=404)


# --- Legacy endpoints -------------------------------------------------------------------

def test_getfileref_answers_a_static_url_that_serves_the_file(client, jpeg):
    client.upload('a b.jpg', jpeg)
    answer = client.get('/getfileref', {'filename': 'a b.jpg', 'coll': 'Fish', 'type': 'O'})
    assert answer.text == 'http://assets.example.org:8080/static/originals/a%20b.jpg'
    assert answer.headers['Access-Control-Allow-Origin'] == '*'
    assert client.web.get('/static/originals/a%20b.jpg').body == jpeg


def test_static_urls_of_collections_include_their_folder(make_client, jpeg):
    client = make_client(COLLECTION_DIRS={'Fish': 'ichthyology'})
    client.upload('a.jpg', jpeg)
    url = client.get('/getfileref', {'filename': 'a.jpg', 'coll': 'Fish', 'type': 'O'}).text
    assert url.endswith('/static/ichthyology/originals/a.jpg')
    assert client.web.get('/static/ichthyology/originals/a.jpg').body == jpeg


KEY_FILE_PATHS = ['/static/.web-asset-server.key', '/static/originals/../.web-asset-server.key',
                  '/static/thumbnails/../.web-asset-server.key', '/static/originals/../../attachments/.web-asset-server.key']


@pytest.mark.disk_only
@pytest.mark.parametrize('path', KEY_FILE_PATHS)
def test_static_never_serves_the_generated_key_file(make_client, jpeg, path):
    client = make_client(KEY=None)                   # the server makes its key in BASE_DIR
    key = open(client.path('.web-asset-server.key'), 'rb').read().strip()
    assert key == client.app.key.encode()
    client.upload('a.jpg', jpeg, token=make_token(client.app.key, 'a.jpg'))
    client.fileget('a.jpg', 'T', scale='50')           # so the thumbnails folder exists too
    answer = client.unlinted.get(path, status=404, expect_errors=True)
    assert key not in answer.body


BESIDE_THE_ATTACHMENTS = {'notes.txt': b'private notes', 'elsewhere/a.jpg': b'not an attachment',
                          'originals/sub/a.jpg': b'nested below originals', 'thumbnails/sub/a_1.jpg': b'nested',
                          'originals/.~wast-0123.part': b'an upload in progress', '.~wast-4567.part': b'staged'}


def plant(client, relative, data):
    """Put bytes at a path relative to the storage's root, past the server (a file, or an S3 object)."""
    if client.config.STORAGE == 's3':
        storage = client.app.storage
        storage.client.put_object(Bucket=storage.bucket, Key=f'{storage.prefix}/{relative}', Body=data)
    else:
        os.makedirs(os.path.dirname(client.path(relative)), exist_ok=True)
        with open(client.path(relative), 'wb') as f:
            f.write(data)


@pytest.mark.parametrize('relative', sorted(BESIDE_THE_ATTACHMENTS))
def test_static_serves_no_stored_file_outside_the_originals_and_thumbnails_folders(client, jpeg, relative):
    client.upload('a.jpg', jpeg)
    plant(client, relative, BESIDE_THE_ATTACHMENTS[relative])
    answer = client.unlinted.get('/static/' + relative, status=404, expect_errors=True)
    assert BESIDE_THE_ATTACHMENTS[relative] not in answer.body


def test_static_does_not_read_an_empty_path_component_as_an_original(client, jpeg):
    client.upload('a.jpg', jpeg)
    assert jpeg not in client.web.get('/static/originals//a.jpg', status=404).body


def test_static_and_getfileref_are_gone_when_static_access_is_off(make_client, jpeg):
    client = make_client(ALLOW_STATIC_FILE_ACCESS=False)
    client.upload('a.jpg', jpeg)
    client.web.get('/static/originals/a.jpg', status=404)
    client.get('/getfileref', {'filename': 'a.jpg', 'type': 'O'}, status=404)


def test_static_answers_a_png_thumbnail_of_a_tiff_as_png_not_by_its_names_extension(client, tmp_path):
    client.upload('scan.tif', make_image(tmp_path, 'plasma:', '120x90', 'tiff'))
    client.fileget('scan.tif', 'T', scale='64')
    assert client.web.get('/static/thumbnails/scan_64.tif').content_type == 'image/png'


def test_static_serves_nothing_without_a_token_when_reads_need_a_key(make_client, jpeg):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg)
    client.web.get('/static/originals/a.jpg', status=403)
    url = client.get('/getfileref', {'filename': 'a.jpg', 'type': 'O', 'token': client.token('a.jpg')}).text
    assert client.web.get(url.replace('http://assets.example.org:8080', '')).body == jpeg


def test_root_says_the_server_works(client):
    answer = client.get('/', {})
    assert answer.status_int == 200 and 'running' in answer.text


# --- On disk: drop-in compatibility -----------------------------------------------------

@pytest.mark.disk_only
def test_existing_upstream_folder_serves_its_originals_and_cached_thumbnails(make_client, tmp_path, jpeg):
    base = tmp_path / 'existing'
    (base / 'originals').mkdir(parents=True)
    (base / 'thumbnails').mkdir()
    (base / 'originals' / 'sp6999.att.jpg').write_bytes(jpeg)
    cached = make_image(tmp_path, 'xc:green', '40x40', 'jpg')
    (base / 'thumbnails' / 'sp6999.att_123.jpg').write_bytes(cached)
    client = make_client(BASE_DIR=str(base))
    assert client.fileget('sp6999.att.jpg').body == jpeg
    assert client.fileget('sp6999.att.jpg', 'T', scale='123').body == cached


@pytest.mark.disk_only
def test_existing_collection_folders_are_served(make_client, tmp_path, jpeg):
    base = tmp_path / 'existing'
    (base / 'fish' / 'originals').mkdir(parents=True)
    (base / 'fish' / 'originals' / 'a.jpg').write_bytes(jpeg)
    client = make_client(BASE_DIR=str(base), COLLECTION_DIRS={'Fish': 'fish'})
    assert client.fileget('a.jpg', coll='Fish').body == jpeg
    assert json.loads(client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish'}).text) == []


# --- Hardening found in review ------------------------------------------------------------

@pytest.mark.parametrize('name, sandboxed', [('a.xsl', True), ('a.rdf', True), ('a.svg', True), ('a.xhtml', True),
                                             ('a.html', True), ('a.mml', True), ('a.jpg', False),
                                             ('a.pdf', False), ('a.txt', False), ('a.mp4', False)])
def test_every_type_that_might_run_scripts_is_served_sandboxed(client, name, sandboxed):
    client.upload(name, b'<x:script xmlns:x="http://www.w3.org/1999/xhtml">alert(1)</x:script>')
    answer = client.fileget(name)
    assert ('Content-Security-Policy' in answer.headers) == sandboxed


@pytest.mark.parametrize('headers', [{'X-Forwarded-Port': 'abc'}, {'X-Forwarded-Port': '443, 8443'},
                                     {'X-Forwarded-Port': '999999'}, {'X-Forwarded-Host': 'a b'},
                                     {'X-Forwarded-Host': 'x:99999'}, {'X-Forwarded-Proto': 'gopher'}])
def test_odd_forwarded_headers_never_break_discovery(make_client, headers):
    client = make_client(TRUST_PROXY_HEADERS=True)
    urls = discovered_urls(client.get('/web_asset_store.xml', {}, headers=headers))
    assert urls['read'].startswith('http') and urls['read'].endswith('/fileget')


def test_forwarded_proto_alone_drops_the_internal_port(make_client):
    client = make_client(TRUST_PROXY_HEADERS=True)
    answer = client.get('/web_asset_store.xml', {}, headers={'X-Forwarded-Proto': 'https'})
    assert discovered_urls(answer)['read'] == 'https://assets.example.org/fileget'


@pytest.mark.parametrize('length', ['²', 'abc', '-1', '1e3', ' 5'])
@pytest.mark.parametrize('path', ['/fileupload', '/filedelete'])
def test_a_malformed_content_length_is_400(client, path, length):
    answer = client.unlinted.request(path, method='POST', status=400, environ={
        'CONTENT_TYPE': 'application/x-www-form-urlencoded', 'CONTENT_LENGTH': length, 'wsgi.input': io.BytesIO(b'a=b')})
    assert 'X-Timestamp' in answer.headers


def test_getfileref_of_a_thumbnail_answers_the_thumbnails_static_url(client, jpeg, tmp_path):
    client.upload('a.jpg', jpeg)
    url = client.get('/getfileref', {'filename': 'a.jpg', 'type': 'T', 'scale': '123'}).text
    assert url == 'http://assets.example.org:8080/static/thumbnails/a_123.jpg'
    assert image_info(client.web.get(url[len('http://assets.example.org:8080'):]).body, tmp_path)[1] == 123


@pytest.mark.disk_only
def test_delete_of_a_pdf_also_removes_png_thumbnails_older_servers_made(client):
    client.upload('doc.pdf', b'%PDF-1.4 not really')
    os.makedirs(client.path('thumbnails'))
    for cached in ('doc_123.png', 'doc_256.png', 'doc_123.pdf', 'doc2_123.png'):
        open(client.path('thumbnails', cached), 'wb').close()
    client.delete('doc.pdf')
    assert client.all_files() == {'thumbnails/doc2_123.png'}


@pytest.mark.disk_only
def test_delete_of_a_pdf_keeps_png_thumbnails_of_a_png_original_of_the_same_root(client, png):
    client.upload('doc.pdf', b'%PDF-1.4 not really')
    client.upload('doc.png', png)
    client.fileget('doc.png', 'T', scale='50')
    client.delete('doc.pdf')
    assert client.all_files() == {'originals/doc.png', 'thumbnails/doc_50.png'}
