"""The security rules, one behaviour per test: names, tokens, static access, storage paths, offload
and the migration's checks. Written to kill the mutants that bench/mutation.py found surviving."""

import datetime
import hashlib
import hmac
import os
import time
import types

import pytest
from botocore.exceptions import ClientError

import migrate
import server
from harness.client import KEY
from kinds import may_run_scripts
from names import is_derivative_of, name_problem, parse_derivative, thumbnail_name, thumbnail_source
from tokens import make_token, token_problem

pytestmark = pytest.mark.disk_only
SERVER = 'http://assets.example.org:8080'


# --- Names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, reason', [
    ('', 'Bad filename: it is missing.'),
    ('..', 'Bad filename: it may not be . or ...'),
    ('a/b', 'Bad filename: it may not contain /, \\ or NUL.'),
    ('a\\b', 'Bad filename: it may not contain /, \\ or NUL.'),
    ('x' * 256, 'Bad filename: it is longer than 255 bytes.'),
    ('.~wast-1.part', 'Bad filename: it may not begin with .~wast-.'),
])
def test_a_refused_filename_is_a_400_that_says_which_rule_it_breaks(client, name, reason):
    answer = client.fileget(name, status=400)
    assert answer.text == reason


def test_a_missing_filename_is_a_400_that_says_it_is_missing(client):
    answer = client.get('/fileget', {'type': 'O'}, status=400)
    assert answer.text == 'Bad filename: it is missing.'


def test_a_name_may_hold_every_printable_ascii_character_but_slash_and_backslash(client):
    name = ''.join(chr(c) for c in range(32, 127) if chr(c) not in '/\\')
    client.upload(name, b'bytes')
    assert client.fileget(name).body == b'bytes'


def test_a_name_of_exactly_255_bytes_is_allowed():
    assert name_problem('x' * 255) is None


def test_a_name_with_a_lone_surrogate_from_an_undecodable_file_name_is_measured_not_an_error():
    assert name_problem('\udcff' * 85) is None
    assert name_problem('\udcff' * 86) == 'is longer than 255 bytes'


def test_only_names_beginning_with_the_temporary_prefix_are_reserved(client):
    client.upload('a.~wast-1.part', b'bytes')
    assert client.fileget('a.~wast-1.part').body == b'bytes'


@pytest.mark.parametrize('scale', ['1', '2000'])
def test_scales_from_1_to_max_thumbnail_scale_are_accepted(scale):
    assert server.valid_scale(scale, 2000) == int(scale)


@pytest.mark.parametrize('scale', ['0', '2001', '0000000005', ' 5', '+5', '5.0', '', None])
def test_a_scale_that_is_not_a_whole_number_from_1_to_the_bound_is_a_400(client, scale):
    client.upload('a.jpg', b'bytes')
    params = {} if scale is None else {'scale': scale}
    answer = client.fileget('a.jpg', 'T', status=400, **params)
    assert answer.text == 'Bad scale: it must be a whole number from 1 to 2000.'


def test_a_thumbnail_cache_name_puts_the_scale_between_the_last_root_and_the_extension():
    assert thumbnail_name('a.b.jpg', 64) == 'a.b_64.jpg'
    assert thumbnail_name('noext', 64) == 'noext_64'


def test_a_webp_thumbnails_cache_name_marks_it_after_the_scale():
    assert thumbnail_name('a.b.jpg', 64, webp=True) == 'a.b_64_webp.jpg'
    assert thumbnail_name('noext', 64, webp=True) == 'noext_64_webp'


@pytest.mark.parametrize('candidate, owned', [('a_64.jpg', True), ('a_0.jpg', True), ('a_.jpg', False),
                                              ('a_6x.jpg', False), ('ab_64.jpg', False), ('a_64.jpgx', False),
                                              ('xa_64.jpg', False), ('a_64.png', False), ('a.jpg', False),
                                              ('a_64_webp.jpg', True), ('a_webp.jpg', False), ('a_64_webpx.jpg', False),
                                              ('a_64_webp_webp.jpg', False), ('a_64.jpg_webp', False)])
def test_a_thumbnail_of_a_jpg_is_named_root_underscore_digits_jpg_and_nothing_else(candidate, owned):
    assert is_derivative_of(candidate, 'a.jpg') is owned


def test_regex_characters_in_a_name_match_only_themselves():
    assert is_derivative_of('a+_1.jpg', 'a+.jpg')
    assert not is_derivative_of('aa_1.jpg', 'a+.jpg')


# --- Tokens ---------------------------------------------------------------------------------------

def test_a_token_is_hex_hmac_md5_of_the_timestamp_then_the_name_with_the_timestamp_after_a_colon():
    digest = hmac.new(KEY.encode(), '1700000000ä.jpg'.encode('utf-8'), hashlib.md5).hexdigest()
    assert make_token(KEY, 'ä.jpg', 1700000000) == f'{digest}:1700000000'


def test_a_token_made_without_a_timestamp_is_stamped_now():
    before = int(time.time())
    stamped = int(make_token(KEY, 'a.jpg').rpartition(':')[2])
    assert before <= stamped <= int(time.time())


def check(token, name='a.jpg', started=1000, tolerance=150, key=KEY):
    return token_problem(key, token, name, started, tolerance)


def test_without_a_key_every_token_passes():
    assert check('', key=None) is None


def test_a_missing_token_is_told_as_missing():
    assert check('') == 'Missing token.'
    assert check(None) == 'Missing token.'


@pytest.mark.parametrize('token', ['abc', ':1000', 'abc:', 'abc:1.5', 'abc:' + '1' * 21, 'abc:--1'])
def test_a_token_without_a_digest_and_a_whole_number_after_the_last_colon_is_malformed(token):
    assert check(token) == 'Malformed token.'


@pytest.mark.parametrize('timestamp', ['01000', '-01000', '-0', '00', '\u0661\u0660\u0660\u0660', '１０００'])
def test_a_timestamp_not_in_the_one_form_str_of_an_integer_writes_is_malformed(timestamp):
    """Leading zeros and non-ASCII digits (which int() reads) spell a timestamp no client writes."""
    digest = make_token(KEY, 'a.jpg', 1000).partition(':')[0]
    assert check(f'{digest}:{timestamp}', tolerance=None) == 'Malformed token.'


def test_the_timestamp_is_what_follows_the_last_colon():
    assert check('a:b:1000') == 'Bad token.'


def test_a_timestamp_of_20_digits_is_read_and_judged_by_age():
    assert check('abc:' + '1' * 20) == 'Token expired: check the clocks of client and server.'


def test_a_negative_timestamp_is_read_when_the_window_is_off():
    assert check(make_token(KEY, 'a.jpg', -5), tolerance=None) is None


@pytest.mark.parametrize('age', [-149, 149])
def test_a_token_less_than_the_tolerance_away_from_the_request_time_passes(age):
    assert check(make_token(KEY, 'a.jpg', 1000 - age)) is None


@pytest.mark.parametrize('age', [-150, 150])
def test_a_token_the_tolerance_or_more_away_from_the_request_time_has_expired(age):
    assert check(make_token(KEY, 'a.jpg', 1000 - age)) == 'Token expired: check the clocks of client and server.'


def test_a_token_over_another_name_is_a_bad_token():
    assert check(make_token(KEY, 'b.jpg', 1000)) == 'Bad token.'


def test_a_token_over_the_empty_name_signs_a_missing_name():
    assert check(make_token(KEY, '', 1000), name=None) is None


def test_a_digest_with_a_lone_surrogate_is_a_bad_token_not_an_error():
    assert check('\udcff:1000') == 'Bad token.'


def test_the_token_check_hands_a_routes_url_arguments_to_it(client):
    client.app.route('/echo/<word>', 'GET', lambda word: word, signed='random')
    assert client.get('/echo/hi', {'random': '1', 'token': client.token('1')}).text == 'hi'


def test_a_refused_token_is_a_403_that_says_why(client):
    stale = client.token('a.jpg', int(time.time()) - 3600)
    answer = client.delete('a.jpg', token=stale, status=403)
    assert answer.text == 'Token expired: check the clocks of client and server.'


def test_testkey_without_random_checks_a_token_over_the_empty_name(client):
    assert client.get('/testkey', {'token': client.token('')}).text == 'Ok.'


def test_testkey_without_random_refuses_a_token_over_other_text(client):
    client.get('/testkey', {'token': client.token('XXXX')}, status=403)


def test_reads_need_no_token_when_require_key_for_get_is_off(client):
    client.upload('a.jpg', b'bytes')
    assert client.get('/getmetadata', {'filename': 'a.jpg'}).text == '[]'


def test_reads_with_require_key_for_get_need_a_token_over_the_filename(make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', b'bytes')
    client.fileget('a.jpg', token=client.token('b.jpg'), status=403)
    assert client.fileget('a.jpg', token=client.token('a.jpg')).body == b'bytes'


# --- Static access and getfileref -------------------------------------------------------------------

def test_getfileref_without_a_type_answers_the_originals_url(client):
    client.upload('a.jpg', b'bytes')
    assert client.get('/getfileref', {'filename': 'a.jpg'}).text == SERVER + '/static/originals/a.jpg'


def test_getfileref_quotes_every_character_of_a_name_outside_the_url_safe_set(client):
    client.upload('a%2Fb?.jpg', b'bytes')
    url = client.get('/getfileref', {'filename': 'a%2Fb?.jpg'}).text
    assert url == SERVER + '/static/originals/a%252Fb%3F.jpg'


def test_getfileref_of_a_refused_filename_is_a_400_that_says_which_rule_it_breaks(client):
    answer = client.get('/getfileref', {'filename': '..'}, status=400)
    assert answer.text == 'Bad filename: it may not be . or ...'


def test_getfileref_of_a_missing_file_is_404(client):
    answer = client.get('/getfileref', {'filename': 'a.jpg'}, status=404)
    assert answer.text == 'No such file.'


def test_getfileref_with_a_bad_type_is_400(client):
    client.upload('a.jpg', b'bytes')
    answer = client.get('/getfileref', {'filename': 'a.jpg', 'type': 'X'}, status=400)
    assert answer.text == 'Bad type: it must be O (original) or T (thumbnail).'


def test_getfileref_of_a_thumbnail_checks_its_scale(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.get('/getfileref', {'filename': 'a.jpg', 'type': 'T', 'scale': '2001'}, status=400)


def test_getfileref_of_a_thumbnail_that_cannot_be_made_is_404_with_the_reason(client):
    client.upload('a.bin', b'not an image')
    answer = client.get('/getfileref', {'filename': 'a.bin', 'type': 'T', 'scale': '64'}, status=404)
    assert answer.text == 'No thumbnail can be made from this kind of file.'


def test_getfileref_of_a_thumbnail_in_a_collection_folder_names_that_folder(make_client, jpeg):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.jpg', jpeg)
    url = client.get('/getfileref', {'filename': 'a.jpg', 'coll': 'Fish', 'type': 'T', 'scale': '64'}).text
    assert url == SERVER + '/static/fish/thumbnails/a_64.jpg'


def test_getfileref_with_require_key_for_get_hands_on_the_token_quoted(make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', b'bytes')
    token = client.token('a.jpg')
    url = client.get('/getfileref', {'filename': 'a.jpg', 'token': token}).text
    assert url == SERVER + '/static/originals/a.jpg?token=' + token.replace(':', '%3A')


def test_static_with_require_key_for_get_needs_a_token_over_the_last_path_part(make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', b'bytes')
    client.get('/static/originals/a.jpg', {'token': client.token('originals/a.jpg')}, status=403)
    assert client.get('/static/originals/a.jpg', {'token': client.token('a.jpg')}).body == b'bytes'


def keyed_client_with_a_thumbnail(make_client, jpeg, **settings):
    """REQUIRE_KEY_FOR_GET on, a.jpg stored and its thumbnail at scale 64 made."""
    client = make_client(REQUIRE_KEY_FOR_GET=True, **settings)
    client.upload('a.jpg', jpeg)
    client.fileget('a.jpg', 'T', scale='64', token=client.token('a.jpg'))
    return client


def test_static_of_a_thumbnail_with_require_key_for_get_takes_a_token_over_its_originals_name(make_client, jpeg):
    client = keyed_client_with_a_thumbnail(make_client, jpeg)
    answer = client.get('/static/thumbnails/a_64.jpg', {'token': client.token('a.jpg')})
    assert answer.body == client.stored('thumbnails/a_64.jpg')


def test_the_getfileref_url_of_a_thumbnail_with_require_key_for_get_serves_it(make_client, jpeg):
    client = keyed_client_with_a_thumbnail(make_client, jpeg, COLLECTION_DIRS={'Fish': 'fish'})
    url = client.get('/getfileref', {'filename': 'a.jpg', 'coll': 'Fish', 'type': 'T', 'scale': '64',
                                     'token': client.token('a.jpg')}).text
    assert client.web.get(url[len(SERVER):]).body == client.stored('fish/thumbnails/a_64.jpg')


def test_a_token_over_a_thumbnails_cache_name_does_not_read_that_thumbnail(make_client, jpeg):
    client = keyed_client_with_a_thumbnail(make_client, jpeg)
    client.upload('a_64.jpg', b'an original of that name')
    client.get('/static/thumbnails/a_64.jpg', {'token': client.token('a_64.jpg')}, status=403)


def test_a_token_over_an_original_does_not_read_an_original_named_like_its_thumbnail(make_client, jpeg):
    client = keyed_client_with_a_thumbnail(make_client, jpeg)
    client.upload('a_64.jpg', b'an original of that name')
    client.get('/static/originals/a_64.jpg', {'token': client.token('a.jpg')}, status=403)


@pytest.mark.parametrize('name', ['a.jpg', 'a_64.jpg', 'noext', '.hidden', 'a.b.c', 'a.', 'x\n_1.jpg', '_1.jpg'])
def test_a_thumbnails_cache_name_leads_back_to_its_original_and_only_to_it(name):
    assert [thumbnail_source(thumbnail_name(name, scale)) for scale in (1, 64, 2000)] == [name] * 3
    assert [parse_derivative(thumbnail_name(name, 64, webp))[:3] for webp in (False, True)] == [
        (name, 64, False), (name, 64, True)]


def test_the_webp_thumbnail_of_a_name_without_extension_is_not_the_thumbnail_of_its_webp_namesake():
    assert thumbnail_name('a', 64, webp=True) != thumbnail_name('a.webp', 64)
    assert not is_derivative_of(thumbnail_name('a', 64, webp=True), 'a.webp')


@pytest.mark.parametrize('candidate', ['a.jpg', '_64.jpg', 'a_064.jpg', 'a_.jpg', 'a_6x.jpg', 'a.b_64', '',
                                       'a_webp.jpg', 'a_064_webp.jpg', '_64_webp.jpg'])
def test_a_name_no_original_has_as_a_thumbnail_leads_to_none(candidate):
    assert thumbnail_source(candidate) is None


def test_static_of_a_path_of_one_part_is_404(client):
    client.upload('a.jpg', b'bytes')
    assert client.web.get('/static/a.jpg', status=404).text == 'No such file.'


def test_static_with_require_key_for_get_of_a_name_no_thumbnail_has_in_thumbnails_is_404_before_any_token(
        make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', b'bytes')
    assert client.web.get('/static/thumbnails/a.jpg', status=404).text == 'No such file.'


def test_static_serves_a_cached_thumbnail(client, jpeg):
    client.upload('a.jpg', jpeg)
    client.fileget('a.jpg', 'T', scale='64')
    assert client.web.get('/static/thumbnails/a_64.jpg').content_type == 'image/jpeg'


def test_static_answers_an_original_with_the_type_of_its_name(client):
    client.upload('a.txt', b'\x89PNG\r\n\x1a\n')
    assert client.web.get('/static/originals/a.txt').content_type == 'text/plain'


def test_static_answers_an_original_without_an_extension_with_the_type_of_its_bytes(client):
    client.upload('noext', b'\x89PNG\r\n\x1a\n')
    assert client.web.get('/static/originals/noext').content_type == 'image/png'


def test_static_answers_an_original_in_a_collection_folder_with_the_type_of_its_name(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.txt', b'\x89PNG\r\n\x1a\n')
    assert client.web.get('/static/fish/originals/a.txt').content_type == 'text/plain'


def test_static_in_a_collection_folder_with_require_key_for_get_needs_a_token_over_the_file_name(make_client):
    client = make_client(REQUIRE_KEY_FOR_GET=True, COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.jpg', b'bytes')
    assert client.get('/static/fish/originals/a.jpg', {'token': client.token('a.jpg')}).body == b'bytes'


def test_static_of_a_folder_named_like_a_file_is_404(client):
    os.makedirs(client.path('originals', 'folder.jpg'))
    answer = client.web.get('/static/originals/folder.jpg', status=404)
    assert answer.text == 'No such file.'


@pytest.mark.parametrize('path', ['/static/fish/originals/.~wast-1.part', '/static/fish/a.jpg',
                                  '/static/fish/other/a.jpg', '/static/fish/originals/sub/a.jpg',
                                  '/static/other/originals/a.jpg', '/static/originals/a.jpg'])
def test_static_with_collection_folders_serves_only_a_collections_originals_and_thumbnails(make_client, path):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    for folder in ('fish/originals', 'other/originals', 'originals', 'fish', 'fish/other', 'fish/originals/sub'):
        os.makedirs(client.path(folder), exist_ok=True)
        with open(client.path(folder, 'a.jpg'), 'wb') as f:
            f.write(b'bytes')
    open(client.path('fish', 'originals', '.~wast-1.part'), 'wb').close()
    client.web.get(path, status=404)
    assert client.web.get('/static/fish/originals/a.jpg').body == b'bytes'


@pytest.mark.parametrize('mimetype, runs', [('image/svg+xml', True), ('text/html', True), ('application/xml', True),
                                            ('image/png', False), ('audio/mpeg', False), ('video/mp4', False),
                                            ('application/pdf', False), ('text/plain', False),
                                            ('application/json', False)])
def test_only_media_and_passive_types_may_be_served_unsandboxed(mimetype, runs):
    assert may_run_scripts(mimetype) is runs


# --- Storage paths and deletion -----------------------------------------------------------------------

def test_an_unknown_collection_is_404_when_collections_map_to_folders(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    answer = client.fileget('a.jpg', coll='Plants', status=404)
    assert answer.text == 'Unknown collection.'


def test_originals_of_a_collection_live_in_its_folder(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.jpg', b'bytes')
    assert client.app.storage.original_path('Fish', 'a.jpg') == client.path('fish', 'originals', 'a.jpg')


def test_deleting_a_file_that_never_had_thumbnails_is_ok(client):
    client.upload('a.jpg', b'bytes')
    assert client.delete('a.jpg').text == 'Ok.'
    assert client.all_files() == set()


def test_deleting_removes_the_thumbnails_in_the_collections_own_folder_only(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Plants': 'plants'})
    client.upload('a.jpg', b'bytes', coll='Fish')
    for folder in ('fish/thumbnails', 'plants/thumbnails', 'thumbnails'):
        os.makedirs(client.path(folder))
        open(client.path(folder, 'a_64.jpg'), 'wb').close()
    client.delete('a.jpg', coll='Fish')
    assert client.all_files() == {'plants/thumbnails/a_64.jpg', 'thumbnails/a_64.jpg'}


def test_deleting_a_pdf_in_a_collection_removes_the_png_thumbnails_older_servers_made_there(make_client):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('doc.pdf', b'%PDF-1.4 not really')
    os.makedirs(client.path('fish', 'thumbnails'))
    open(client.path('fish', 'thumbnails', 'doc_64.png'), 'wb').close()
    assert client.delete('doc.pdf').text == 'Ok.'
    assert client.all_files() == set()


def test_deleting_a_pdf_with_an_upper_case_extension_removes_the_png_thumbnails_older_servers_made(client):
    client.upload('doc.PDF', b'%PDF-1.4 not really')
    os.makedirs(client.path('thumbnails'))
    open(client.path('thumbnails', 'doc_64.png'), 'wb').close()
    client.delete('doc.PDF')
    assert client.all_files() == set()


def test_deleting_a_jpg_leaves_png_thumbnails_of_the_same_root(client):
    client.upload('doc.jpg', b'bytes')
    os.makedirs(client.path('thumbnails'))
    open(client.path('thumbnails', 'doc_64.png'), 'wb').close()
    client.delete('doc.jpg')
    assert client.all_files() == {'thumbnails/doc_64.png'}


# --- Offload to the web server in front ------------------------------------------------------------

def test_nginx_offload_answers_an_empty_200_with_x_accel_redirect_to_the_quoted_path(make_client):
    client = make_client(FILE_OFFLOAD='nginx', COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a b.jpg', b'\xff\xd8\xff bytes')
    answer = client.fileget('a b.jpg')
    assert (answer.status_int, answer.body) == (200, b'')
    assert answer.headers['X-Accel-Redirect'] == '/protected-attachments/fish/originals/a%20b.jpg'


def test_offload_hands_on_the_type_nosniff_and_the_download_name(make_client):
    client = make_client(FILE_OFFLOAD='nginx')
    client.upload('a.jpg', b'\xff\xd8\xff bytes')
    answer = client.fileget('a.jpg', downloadname='b.jpg')
    assert answer.headers['Content-Type'] == 'image/jpeg'
    assert answer.headers['X-Content-Type-Options'] == 'nosniff'
    assert answer.headers['Content-Disposition'] == "inline; filename*=utf-8''b.jpg"


def test_offload_of_a_thumbnail_tells_its_type_from_its_bytes(make_client, jpeg):
    client = make_client(FILE_OFFLOAD='nginx')
    client.upload('a.jpg', jpeg)
    answer = client.fileget('a.jpg', 'T', scale='64')
    assert answer.headers['Content-Type'] == 'image/jpeg'
    assert answer.headers['X-Accel-Redirect'] == '/protected-attachments/thumbnails/a_64.jpg'


def test_offload_of_content_that_might_run_scripts_is_sandboxed(make_client):
    client = make_client(FILE_OFFLOAD='nginx')
    client.upload('a.html', b'<script>alert(1)</script>')
    assert client.fileget('a.html').headers['Content-Security-Policy'] == 'sandbox'


def test_offload_of_media_is_not_sandboxed(make_client):
    client = make_client(FILE_OFFLOAD='nginx')
    client.upload('a.jpg', b'\xff\xd8\xff bytes')
    assert 'Content-Security-Policy' not in client.fileget('a.jpg').headers


def test_apache_offload_answers_an_empty_200_with_x_sendfile_to_the_absolute_path(make_client):
    client = make_client(FILE_OFFLOAD='apache')
    client.upload('a.jpg', b'\xff\xd8\xff bytes')
    answer = client.fileget('a.jpg')
    assert (answer.status_int, answer.body) == (200, b'')
    assert answer.headers['X-Sendfile'] == client.path('originals', 'a.jpg')
    assert 'X-Accel-Redirect' not in answer.headers


@pytest.mark.parametrize('name', ['a\nb.jpg', 'a\rb.jpg', 'a\r\nX-Injected: 1.jpg', 'a\x1bb.jpg', 'a\x7fb.jpg'])
def test_apache_offload_of_a_name_with_a_control_character_is_served_by_the_server_itself(make_client, name):
    client = make_client(FILE_OFFLOAD='apache')
    client.upload(name, b'\xff\xd8\xff bytes')
    answer = client.fileget(name)
    assert (answer.status_int, answer.body) == (200, b'\xff\xd8\xff bytes')
    assert 'X-Sendfile' not in answer.headers and 'X-Injected' not in answer.headers


# --- The migration's checks -----------------------------------------------------------------------------

MiB = 1024 * 1024


def md5(data):
    return hashlib.md5(data).hexdigest()


def test_the_etag_of_a_file_below_16_mib_is_the_quoted_md5_of_its_bytes(tmp_path):
    data = b'x' * (16 * MiB - 1)
    (tmp_path / 'f').write_bytes(data)
    assert migrate.expected_etag(str(tmp_path / 'f')) == f'"{md5(data)}"'


@pytest.mark.parametrize('size, parts', [(16 * MiB, 1), (16 * MiB + 1, 2)])
def test_the_etag_of_a_file_of_16_mib_or_more_is_the_md5_of_its_16_mib_parts_md5s_and_their_count(tmp_path, size, parts):
    data = b'a' * (size - 1) + b'b'
    (tmp_path / 'f').write_bytes(data)
    digests = b''.join(hashlib.md5(data[at:at + 16 * MiB]).digest() for at in range(0, size, 16 * MiB))
    assert migrate.expected_etag(str(tmp_path / 'f')) == f'"{md5(digests)}-{parts}"'


@pytest.mark.parametrize('etag, checkable', [('"%s"' % ('0' * 32), True), ('"%s-12"' % ('a' * 32), True),
                                             ('%s' % ('0' * 32), False), ('"%s"' % ('0' * 31), False),
                                             ('"%s-"' % ('0' * 32), False), ('"%s"' % ('A' * 32), False),
                                             ('"%s"x' % ('0' * 32), False), (None, False)])
def test_only_md5_etags_are_compared(etag, checkable):
    assert migrate.is_checkable(etag) is checkable


class Store:
    """An S3 bucket in memory, as much of a boto3 client as migrate.py uses; `etags` may lie."""

    modified = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)

    def __init__(self):
        self.objects, self.etags, self.corrupt = {}, {}, set()

    def put(self, key, data):
        self.objects[key] = data

    def etag(self, key):
        return self.etags.get(key, f'"{md5(self.objects[key])}"')

    def head_object(self, Bucket, Key):
        assert Bucket == 'attachments'
        if Key not in self.objects:
            raise ClientError({'Error': {'Code': '404'}, 'ResponseMetadata': {'HTTPStatusCode': 404}}, 'HeadObject')
        return {'ContentLength': len(self.objects[Key]), 'ETag': self.etag(Key)}

    def upload_file(self, path, bucket, key, Config=None, ExtraArgs=None):
        with open(path, 'rb') as f:
            self.objects[key] = f.read()

    def download_file(self, bucket, key, path, Config=None):
        data = self.objects[key]
        with open(path, 'wb') as f:
            f.write(data[:-1] + b'?' if key in self.corrupt else data)

    def get_paginator(self, operation):
        assert operation == 'list_objects_v2'
        store = self

        class Paginator:
            def paginate(self, Bucket, Prefix):
                """One page; like S3, without Contents when nothing matches."""
                assert Bucket == 'attachments'
                keys = sorted(key for key in store.objects if key.startswith(Prefix))
                yield {'Contents': [{'Key': key, 'Size': len(store.objects[key]), 'ETag': store.etag(key),
                                     'LastModified': store.modified} for key in keys]} if keys else {}
        return Paginator()


@pytest.fixture
def store(monkeypatch):
    bucket = Store()
    monkeypatch.setattr(migrate, 'make_client', lambda config: bucket)
    return bucket


def migration_config(prefix='pre'):
    return types.SimpleNamespace(S3_BUCKET='attachments', S3_PREFIX=prefix, ORIG_DIR='originals', THUMB_DIR='thumbnails',
                                 COLLECTION_DIRS=None, BASE_DIR='unused')     # the last two: the folder's checksums


def test_an_object_counts_as_copied_only_with_the_same_size_and_md5(store):
    store.put('k', b'abc')
    head = migrate.object_head(store, 'attachments', 'k')
    assert migrate.same_object(head, 3, f'"{md5(b"abc")}"')
    assert not migrate.same_object(head, 4, f'"{md5(b"abc")}"')
    assert not migrate.same_object(head, 3, f'"{md5(b"abd")}"')
    assert not migrate.same_object(migrate.object_head(store, 'attachments', 'missing'), 3, f'"{md5(b"abc")}"')


def test_an_object_whose_etag_is_no_md5_counts_as_copied_by_its_size(store):
    store.put('k', b'abc')
    store.etags['k'] = '"kms-encrypted"'
    assert migrate.same_object(migrate.object_head(store, 'attachments', 'k'), 3, f'"{md5(b"xyz")}"')


def write(folder, relative, data=b'bytes'):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_the_walk_takes_originals_and_thumbnails_at_the_top_or_one_collection_folder_down(tmp_path):
    for relative in ('originals/a.jpg', 'thumbnails/a_64.jpg', 'fish/originals/b.jpg', 'fish/thumbnails/b_64.jpg',
                     'key.txt', 'fish/c.jpg', 'other/d.jpg', 'deep/fish/originals/e.jpg',
                     'originals/.~wast-1.part', '.~wast-dir/originals/f.jpg', 'fish/.~wast-x/originals/g.jpg'):
        write(tmp_path, relative)
    found = sorted(parts for parts, _path in migrate.folder_files(str(tmp_path), migration_config()))
    assert found == [['fish', 'originals', 'b.jpg'], ['fish', 'thumbnails', 'b_64.jpg'],
                     ['originals', 'a.jpg'], ['thumbnails', 'a_64.jpg']]


def test_the_walk_gives_each_files_path(tmp_path):
    write(tmp_path, 'fish/originals/b.jpg')
    assert list(migrate.folder_files(str(tmp_path), migration_config())) == \
        [(['fish', 'originals', 'b.jpg'], str(tmp_path / 'fish' / 'originals' / 'b.jpg'))]


def test_the_bucket_listing_takes_only_attachment_keys_under_the_prefix(store):
    for key in ('pre/originals/a.jpg', 'pre/fish/thumbnails/b_64.jpg', 'pre/a.jpg', 'pre/x/fish/originals/c.jpg',
                'pre/fish/originals/.~wast-1.part', 'pre/../originals/d.jpg', 'pre/originals/..',
                'other/originals/e.jpg', 'prefix/originals/f.jpg', 'pre/other/g.jpg'):
        store.put(key, b'abc')
    found = [(parts, key, size) for parts, key, size, *_ in migrate.bucket_objects(store, migration_config())]
    assert found == [(['fish', 'thumbnails', 'b_64.jpg'], 'pre/fish/thumbnails/b_64.jpg', 3),
                     (['originals', 'a.jpg'], 'pre/originals/a.jpg', 3)]


def test_the_bucket_listing_without_a_prefix_takes_keys_from_the_top(store):
    store.put('originals/a.jpg', b'abc')
    assert [parts for parts, *_ in migrate.bucket_objects(store, migration_config(prefix=''))] == [['originals', 'a.jpg']]


def test_the_bucket_listing_of_an_empty_bucket_is_empty(store):
    assert list(migrate.bucket_objects(store, migration_config())) == []


def test_the_bucket_listing_takes_the_prefix_as_set_less_its_slashes(store):
    store.put('BOX/originals/a.jpg', b'abc')
    assert [key for _, key, *_ in migrate.bucket_objects(store, migration_config(prefix='/BOX/'))] == ['BOX/originals/a.jpg']


def counted(copied, there, failed):
    """The counts of a migration of originals only, without conflicts or skipped files."""
    return {'copied': copied, 'already there': there, 'failed': failed, 'conflicts': 0, 'skipped': 0,
            'thumbnails left out': 0}


def test_migration_from_the_bucket_skips_each_file_with_the_same_size_and_md5(store, tmp_path):
    for name in ('a.jpg', 'b.jpg'):
        store.put(f'pre/originals/{name}', b'abc')
        write(tmp_path, f'originals/{name}', b'abc')
    assert migrate.from_s3(migration_config(), str(tmp_path), False) == counted(copied=0, there=2, failed=0)


@pytest.mark.parametrize('local', [b'abd', b'abcd'])
def test_migration_from_the_bucket_replaces_a_file_of_another_size_or_md5(store, tmp_path, local):
    store.put('pre/originals/a.jpg', b'abc')
    write(tmp_path, 'originals/a.jpg', local)
    assert migrate.from_s3(migration_config(), str(tmp_path), False) == counted(copied=1, there=0, failed=0)
    assert (tmp_path / 'originals' / 'a.jpg').read_bytes() == b'abc'


def test_migration_from_the_bucket_judges_a_file_by_its_size_when_the_etag_is_no_md5(store, tmp_path):
    store.put('pre/originals/a.jpg', b'abc')
    store.etags['pre/originals/a.jpg'] = '"kms-encrypted"'
    write(tmp_path, 'originals/a.jpg', b'xyz')
    assert migrate.from_s3(migration_config(), str(tmp_path), False)['already there'] == 1


def test_migration_from_the_bucket_keeps_no_download_whose_md5_differs(store, tmp_path):
    store.put('pre/originals/a.jpg', b'abc')
    store.corrupt.add('pre/originals/a.jpg')
    assert migrate.from_s3(migration_config(), str(tmp_path), False) == counted(copied=0, there=0, failed=1)
    assert os.listdir(tmp_path / 'originals') == []


def test_migration_from_the_bucket_keeps_no_download_whose_size_differs(store, tmp_path):
    store.put('pre/originals/a.jpg', b'abc')
    store.etags['pre/originals/a.jpg'] = '"kms-encrypted"'
    store.download_file = lambda bucket, key, path, Config=None: open(path, 'wb').write(b'ab')
    assert migrate.from_s3(migration_config(), str(tmp_path), False)['failed'] == 1
    assert os.listdir(tmp_path / 'originals') == []


def test_migration_from_the_bucket_keeps_a_download_without_md5_of_the_right_size(store, tmp_path):
    store.put('pre/originals/a.jpg', b'abc')
    store.etags['pre/originals/a.jpg'] = '"kms-encrypted"'
    assert migrate.from_s3(migration_config(), str(tmp_path), False)['copied'] == 1
    assert (tmp_path / 'originals' / 'a.jpg').read_bytes() == b'abc'
