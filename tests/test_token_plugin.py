"""The token plugin for every route and method, in-process: which requests need a token (writes always, reads
with REQUIRE_KEY_FOR_GET, HEAD as GET, preflights and public documents never), that a token a file was read with
cannot then write it (read with a required token, or sent though none was needed), and that an answer that
needed a token is kept out of shared caches. test_hostile.py asks a real `python server.py` the same."""

from urllib.parse import urlencode

import pytest

from harness.client import KEY, expect
from tokens import ReadTokens, make_token

pytestmark = pytest.mark.disk_only
READ_WITH = 'This token was used to read the file: a change needs a token of its own (make a new one).'


def ask(client, method, path, params=None, status=None):
    """One request of any method, its parameters in the query string."""
    target = path + ('?' + urlencode(params) if params else '')
    return expect(status, client.web.request(target, method=method, expect_errors=status is not None))


def fresh(client, name, read):
    """A token Specify would mint for a write: valid, and not the one read with (a second before it)."""
    return client.token(name, int(read.rpartition(':')[2]) - 1)


# Every read route, by method: (method, path, parameters naming a.jpg); each needs a token over a.jpg with
# REQUIRE_KEY_FOR_GET, and none without it.
READS = {
    'GET fileget': ('GET', '/fileget', {'filename': 'a.jpg', 'type': 'O'}),
    'HEAD fileget': ('HEAD', '/fileget', {'filename': 'a.jpg', 'type': 'O'}),
    'GET fileget thumbnail': ('GET', '/fileget', {'filename': 'a.jpg', 'type': 'T', 'scale': '32'}),
    'GET getmetadata': ('GET', '/getmetadata', {'filename': 'a.jpg'}),
    'HEAD getmetadata': ('HEAD', '/getmetadata', {'filename': 'a.jpg'}),
    'GET getfileref': ('GET', '/getfileref', {'filename': 'a.jpg'}),
    'GET static': ('GET', '/static/originals/a.jpg', {}),
    'HEAD static': ('HEAD', '/static/originals/a.jpg', {}),
}


@pytest.fixture
def keyed(make_client, jpeg):
    """REQUIRE_KEY_FOR_GET on, a.jpg stored."""
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg)
    return client


@pytest.fixture
def open_reads(make_client, jpeg):
    """REQUIRE_KEY_FOR_GET off, a.jpg stored."""
    client = make_client()
    client.upload('a.jpg', jpeg)
    return client


def read(client, case, token=None, status=None):
    method, path, params = READS[case]
    return ask(client, method, path, dict(params, **({'token': token} if token else {})), status)


# --- Which requests need a token -------------------------------------------------------------------------

@pytest.mark.parametrize('case', READS)
def test_with_require_key_for_get_every_read_without_a_token_is_403_missing_token(keyed, case):
    answer = read(keyed, case, status=403)
    assert answer.text == ('Missing token.' if answer.request.method == 'GET' else '')


@pytest.mark.parametrize('case', READS)
def test_with_require_key_for_get_every_read_with_a_token_over_another_name_is_403(keyed, case):
    read(keyed, case, token=keyed.token('b.jpg'), status=403)


@pytest.mark.parametrize('case', READS)
def test_with_require_key_for_get_every_read_with_its_token_is_answered(keyed, case):
    read(keyed, case, token=keyed.token('a.jpg'), status=200)


@pytest.mark.parametrize('case', READS)
def test_without_require_key_for_get_every_read_is_answered_without_a_token(open_reads, case):
    read(open_reads, case, status=200)


@pytest.mark.parametrize('case', READS)
def test_without_require_key_for_get_a_bad_token_sent_with_a_read_is_no_refusal(open_reads, case):
    read(open_reads, case, token='not-a-token', status=200)


WRITES = {
    'upload': lambda client, token, status: client.upload('b.jpg', b'bytes', token=token, status=status),
    'delete': lambda client, token, status: client.delete('a.jpg', token=token, status=status),
    'testkey': lambda client, token, status: client.get('/testkey', {'random': 'a.jpg', 'token': token}, status),
}


@pytest.mark.parametrize('write', WRITES)
def test_every_write_and_testkey_need_a_token_though_reads_need_none(open_reads, write):
    assert WRITES[write](open_reads, '', 403).text == 'Missing token.'


@pytest.mark.parametrize('write', WRITES)
def test_every_write_and_testkey_pass_with_a_token_over_their_name(open_reads, write):
    WRITES[write](open_reads, open_reads.token('b.jpg' if write == 'upload' else 'a.jpg'), 200)


@pytest.mark.parametrize('method, path', [('GET', '/'), ('GET', '/health'), ('GET', '/web_asset_store.xml'),
                                          ('GET', '/capabilities.json'), ('HEAD', '/'),
                                          ('OPTIONS', '/fileupload'), ('OPTIONS', '/filedelete'),
                                          ('OPTIONS', '/fileget'), ('OPTIONS', '/testkey')])
def test_public_documents_and_preflights_need_no_token_even_with_require_key_for_get(keyed, method, path):
    ask(keyed, method, path, status=200)


def test_a_route_added_without_a_signed_parameter_needs_no_token(keyed):
    keyed.app.route('/open', 'GET', lambda: 'open')
    assert ask(keyed, 'GET', '/open', status=200).text == 'open'


def test_a_read_route_takes_its_token_over_the_parameter_it_names(keyed):
    keyed.app.route('/named', 'GET', lambda: 'named', signed='which', read=True)
    ask(keyed, 'GET', '/named', {'which': 'x', 'token': keyed.token('a.jpg')}, status=403)
    assert ask(keyed, 'GET', '/named', {'which': 'x', 'token': keyed.token('x')}, status=200).text == 'named'


def test_a_read_routes_missing_parameter_is_signed_as_the_empty_name(keyed):
    keyed.app.route('/named', 'GET', lambda: 'named', signed='which', read=True)
    assert ask(keyed, 'GET', '/named', {'token': keyed.token('')}, status=200).text == 'named'


def test_without_a_key_no_request_needs_a_token(make_client, jpeg):
    client = make_client(AUTH_DISABLED=True, REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', jpeg, token='')
    assert client.fileget('a.jpg').body == jpeg
    client.delete('a.jpg', token='', status=200)


# --- A token read with cannot write ----------------------------------------------------------------------

@pytest.mark.parametrize('case', READS)
def test_a_token_a_file_was_read_with_cannot_delete_it(keyed, case):
    token = keyed.token('a.jpg')
    read(keyed, case, token=token, status=200)
    assert keyed.delete('a.jpg', token=token, status=403).text == READ_WITH


@pytest.mark.parametrize('case', READS)
def test_a_valid_token_sent_with_a_read_that_needed_none_cannot_delete_the_file(open_reads, case):
    token = open_reads.token('a.jpg')
    read(open_reads, case, token=token, status=200)
    assert open_reads.delete('a.jpg', token=token, status=403).text == READ_WITH


def test_a_token_a_file_was_read_with_cannot_replace_it(keyed, jpeg):
    token = keyed.token('a.jpg')
    keyed.fileget('a.jpg', token=token)
    assert keyed.upload('a.jpg', b'replaced', token=token, status=403).text == READ_WITH
    assert keyed.fileget('a.jpg', token=fresh(keyed, 'a.jpg', token)).body == jpeg


def test_a_token_of_its_own_deletes_a_file_that_was_read(keyed):
    token = keyed.token('a.jpg')
    keyed.fileget('a.jpg', token=token)
    assert keyed.delete('a.jpg', token=fresh(keyed, 'a.jpg', token)).text == 'Ok.'


def test_a_token_that_wrote_a_file_still_reads_it_and_then_cannot_write_it_again(keyed):
    token = keyed.token('b.jpg')
    keyed.upload('b.jpg', b'bytes', token=token)
    assert keyed.fileget('b.jpg', token=token).body == b'bytes'
    assert keyed.delete('b.jpg', token=token, status=403).text == READ_WITH


def test_a_token_sent_with_a_read_it_does_not_sign_is_not_remembered(open_reads):
    token = open_reads.token('b.jpg')
    open_reads.upload('b.jpg', b'bytes', token=fresh(open_reads, 'b.jpg', token))
    read(open_reads, 'GET fileget', token=token, status=200)         # a.jpg, which needs no token
    assert open_reads.delete('b.jpg', token=token).text == 'Ok.'


def test_a_token_the_testkey_check_passed_is_not_remembered_as_read_with(open_reads):
    token = open_reads.token('a.jpg')
    open_reads.get('/testkey', {'random': 'a.jpg', 'token': token})
    assert open_reads.delete('a.jpg', token=token).text == 'Ok.'


def test_a_refused_name_is_its_own_400_even_with_a_token_it_was_read_with(keyed):
    token = keyed.token('..')
    keyed.fileget('..', token=token, status=400)
    assert keyed.delete('..', token=token, status=400).text == 'Bad filename: it may not be . or ...'


# --- Tokens read with, remembered: at most so many, each until its window ends ------------------------------

def noted(tokens, *pairs, tolerance=150):
    """ReadTokens after noting each (token timestamp, time of the read) in turn."""
    for timestamp, now in pairs:
        tokens.note(make_token(KEY, 'a.jpg', timestamp), now, tolerance)
    return tokens


def remembered(tokens, *timestamps):
    return [tokens.read_with(make_token(KEY, 'a.jpg', timestamp)) for timestamp in timestamps]


def test_read_tokens_keep_at_most_their_bound_forgetting_the_oldest_first():
    tokens = noted(ReadTokens(2), (1000, 1000), (1001, 1001), (1002, 1002))
    assert remembered(tokens, 1000, 1001, 1002) == [False, True, True]


def test_a_token_noted_again_is_the_newest_so_the_bound_forgets_another_first():
    tokens = noted(ReadTokens(2), (1000, 1000), (1001, 1001), (1000, 1001), (1002, 1002))
    assert remembered(tokens, 1000, 1001, 1002) == [True, False, True]


def test_read_tokens_are_forgotten_once_their_window_has_ended():
    tokens = noted(ReadTokens(10), (1000, 1000), (1100, 1100), (1200, 1150))
    assert remembered(tokens, 1000, 1100, 1200) == [False, True, True]      # 1000 + 150 <= 1150


def test_a_read_token_is_remembered_until_the_end_of_its_window_not_before():
    tokens = noted(ReadTokens(10), (1000, 1000), (1200, 1149))
    assert remembered(tokens, 1000, 1200) == [True, True]


def test_without_a_time_window_read_tokens_are_forgotten_only_for_the_bound():
    tokens = noted(ReadTokens(2), (1000, 1000), (1001, 10 ** 9), tolerance=None)
    assert remembered(tokens, 1000, 1001) == [True, True]
    noted(tokens, (1002, 10 ** 9), tolerance=None)
    assert remembered(tokens, 1000, 1001, 1002) == [False, True, True]


# --- Answers that needed a token are private --------------------------------------------------------------

@pytest.mark.parametrize('case', ['GET fileget', 'GET fileget thumbnail', 'GET static'])
def test_an_answer_that_needed_a_token_is_private_to_the_browser(keyed, case):
    answer = read(keyed, case, token=keyed.token('a.jpg'), status=200)
    assert answer.headers['Cache-Control'].split(',')[0] == 'private'


def test_a_write_answer_is_private_to_the_browser(open_reads):
    assert open_reads.delete('a.jpg').headers['Cache-Control'] == 'private'


def test_an_answer_to_a_read_that_needed_no_token_is_not_made_private_by_a_token_sent(open_reads):
    answer = read(open_reads, 'GET fileget thumbnail', token=open_reads.token('a.jpg'), status=200)
    assert 'private' not in answer.headers.get('Cache-Control', '')
