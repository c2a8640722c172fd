"""Viewer grants, in-process: a token-bearing IIIF request hands the viewer a grant, '<expires>.<32 hex>', that
stands for the token in its URLs (/iiif/grant/<grant>/...) for one image until it expires; what a grant is made
of, when it is minted and until when it is taken, and which of a token and a grant an IIIF request needs.
test_iiif_keys.py asks every IIIF path with good and bad grants; test_hostile.py a real `python server.py`."""

import hashlib
import hmac
import json

import pytest

import iiif
from harness.client import KEY
from harness.images import make_image

pytestmark = pytest.mark.disk_only
BASE = 'http://assets.example.org:8080'
NOW = 1_000_000_000                 # the server's clock in these tests
LIFETIME = 3600                     # IIIF_GRANT_SECONDS by default


@pytest.fixture(scope='module')
def picture(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp('picture'), 'plasma:', '300x200', 'jpg')


def grant(expires, name, coll=None, key=KEY):
    """A grant as the server makes it: the expiry, '.', the first 32 hex digits of HMAC-SHA256 under the key of
    'iiif-grant', the expiry, the collection ('' without COLLECTION_DIRS) and the name, NUL between each."""
    message = f'iiif-grant\0{expires}\0{coll or ""}\0{name}'.encode()
    return f'{expires}.{hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:32]}'


class Clock:
    """A server's clock the test sets: `now`, in epoch seconds."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def at(client, now):
    """The client's server with its clock at `now` (a float: requests start within a second); upload first, as
    the client's tokens are made at the real time."""
    if isinstance(client.app.clock, Clock):
        client.app.clock.now = now
    else:
        client.app.clock = Clock(now)
    return client


@pytest.fixture
def keyed(make_client, picture):
    """REQUIRE_KEY_FOR_GET on, a.jpg stored, the clock at NOW."""
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.jpg', picture)
    return at(client, NOW)


def info(client, path, status=200, **params):
    answer = client.get(path, params, status=status)
    return json.loads(answer.body) if status == 200 else answer


def handed(client, name='a.jpg', identifier=None, now=NOW):
    """The grant info.json hands a viewer for a token made at `now`."""
    document = info(client, f'/iiif/3/{identifier or name}/info.json', token=client.token(name, int(now)))
    return document['id'].split('/')[5]


def tile(client, grant_, identifier='a.jpg', status=200):
    return client.get(f'/iiif/grant/{grant_}/3/{identifier}/full/100,/0/default.jpg', {}, status=status)


# --- What a grant is, and when it is minted --------------------------------------------------------------

def test_a_grant_is_the_expiry_and_an_hmac_sha256_of_purpose_expiry_collection_and_name(keyed):
    assert handed(keyed) == grant(1_000_003_620, 'a.jpg')


def test_a_grant_expires_its_lifetime_after_the_request_rounded_up_to_a_whole_minute(keyed):
    assert [handed(at(keyed, now), now=now).split('.')[0] for now in (NOW, NOW + 19.5, NOW + 20, NOW + 21)] == \
        ['1000003620', '1000003620', '1000003620', '1000003680']


def test_a_grant_follows_iiif_grant_seconds(make_client, picture):
    client = make_client(REQUIRE_KEY_FOR_GET=True, IIIF_GRANT_SECONDS=60)
    client.upload('a.jpg', picture)
    assert handed(at(client, NOW)).split('.')[0] == '1000000080'


def test_a_grant_in_a_collection_folder_signs_the_collection_too(make_client, picture):
    client = make_client(REQUIRE_KEY_FOR_GET=True, COLLECTION_DIRS={'Fish': 'fish'})
    client.upload('a.jpg', picture)
    identifier = iiif.identifier_for('Fish', 'a.jpg', {'Fish': 'fish'})
    assert handed(at(client, NOW), identifier=identifier) == grant(1_000_003_620, 'a.jpg', 'Fish')


def test_the_grant_given_is_the_one_the_service_urls_carry(keyed):
    given = handed(keyed)
    at(keyed, NOW + 600)                                    # a new grant now would expire later
    document = info(keyed, f'/iiif/grant/{given}/3/a.jpg/info.json')
    assert document['id'] == f'{BASE}/iiif/grant/{given}/3/a.jpg'


def test_without_require_key_for_get_no_grant_is_minted_though_a_token_is_sent(make_client, picture):
    client = make_client()
    client.upload('a.jpg', picture)
    document = info(at(client, NOW), '/iiif/3/a.jpg/info.json', token=client.token('a.jpg', NOW))
    assert document['id'] == f'{BASE}/iiif/3/a.jpg'


def test_without_a_key_no_grant_is_minted_and_any_grant_is_taken(make_client, picture):
    client = make_client(REQUIRE_KEY_FOR_GET=True, AUTH_DISABLED=True)
    client.upload('a.jpg', picture, token='')
    assert info(client, '/iiif/3/a.jpg/info.json')['id'] == f'{BASE}/iiif/3/a.jpg'
    tile(client, '1.' + '0' * 32)


# --- Until when a grant is taken ------------------------------------------------------------------------

def test_a_grant_is_taken_until_the_second_before_it_expires(keyed):
    tile(at(keyed, 1_000_003_619.9), grant(1_000_003_620, 'a.jpg'))


def test_a_grant_is_refused_from_the_second_it_expires(keyed):
    answer = tile(at(keyed, 1_000_003_620), grant(1_000_003_620, 'a.jpg'), status=403)
    assert answer.text == 'The viewer grant has expired: open the image again.'


def test_a_grant_expiring_up_to_its_lifetime_and_a_minute_ahead_is_taken(keyed):
    tile(keyed, grant(NOW + LIFETIME + 60, 'a.jpg'))


def test_a_grant_expiring_further_ahead_than_its_lifetime_and_a_minute_is_refused(keyed):
    answer = tile(keyed, grant(NOW + LIFETIME + 61, 'a.jpg'), status=403)
    assert answer.text == 'The viewer grant has expired: open the image again.'


@pytest.mark.parametrize('bad', ['1000003620.' + '0' * 31, '1000003620.' + '0' * 33, '1000003620' + '0' * 32,
                                 '1000000000000.' + '0' * 32, '.' + '0' * 32, '1000003620.' + 'A' * 32,
                                 ' 1000003620.' + '0' * 32])
def test_a_grant_not_of_up_to_12_digits_a_dot_and_32_lower_case_hex_digits_is_malformed(keyed, bad):
    assert tile(keyed, bad, status=403).text == 'Malformed viewer grant.'


def test_a_grant_of_12_digits_is_read_as_its_expiry(keyed):
    assert tile(keyed, '100000000000.' + '0' * 32, status=403).text == \
        'The viewer grant has expired: open the image again.'


def test_a_grant_with_the_mac_of_another_key_is_a_bad_grant(keyed):
    assert tile(keyed, grant(1_000_003_620, 'a.jpg', key='another key'), status=403).text == 'Bad viewer grant.'


def test_a_grant_for_another_name_is_a_bad_grant(keyed):
    assert tile(keyed, grant(1_000_003_620, 'b.jpg'), status=403).text == 'Bad viewer grant.'


def test_a_grant_for_one_collection_and_name_does_not_open_another_that_joins_to_the_same_text(make_client, picture):
    collections = {'ab': 'ab', 'a': 'a'}
    client = make_client(REQUIRE_KEY_FOR_GET=True, COLLECTION_DIRS=collections)
    client.upload('c.jpg', picture, coll='ab')
    client.upload('bc.jpg', picture, coll='a')
    at(client, NOW)
    given = grant(1_000_003_620, 'c.jpg', 'ab')
    tile(client, given, iiif.identifier_for('ab', 'c.jpg', collections))
    tile(client, given, iiif.identifier_for('a', 'bc.jpg', collections), status=403)


def test_a_grant_given_is_checked_though_reads_need_no_token(make_client, picture):
    client = make_client()
    client.upload('a.jpg', picture)
    at(client, NOW)
    assert tile(client, grant(1_000_003_620, 'b.jpg'), status=403).text == 'Bad viewer grant.'
    tile(client, grant(1_000_003_620, 'a.jpg'))


# --- Which of a token and a grant an IIIF request needs ---------------------------------------------------

def test_an_answer_under_a_grant_is_private_to_the_browser(make_client, picture):
    client = make_client()
    client.upload('a.jpg', picture)
    at(client, NOW)
    assert tile(client, grant(1_000_003_620, 'a.jpg')).headers['Cache-Control'].startswith('private')


def test_an_iiif_answer_that_needed_no_token_or_grant_is_public(make_client, picture):
    client = make_client()
    client.upload('a.jpg', picture)
    answer = client.get('/iiif/3/a.jpg/full/100,/0/default.jpg', {})
    assert answer.headers['Cache-Control'] == 'public, max-age=86400'


def test_with_require_key_for_get_an_iiif_request_needs_a_token_over_the_name(keyed):
    assert keyed.get('/iiif/3/a.jpg/info.json', {'token': keyed.token('b.jpg', NOW)}, status=403).text == \
        'Bad token.'
    assert keyed.get('/iiif/3/a.jpg/info.json', {}, status=403).text == 'Missing token.'


def test_a_token_sent_with_an_iiif_read_that_needed_none_cannot_then_delete_the_file(make_client, picture):
    client = make_client()
    client.upload('a.jpg', picture)
    token = client.token('a.jpg')
    client.get('/iiif/3/a.jpg/info.json', {'token': token})
    assert client.delete('a.jpg', token=token, status=403).text.startswith('This token was used to read the file')


@pytest.mark.parametrize('token', [False, True], ids=['without a token', 'with a token'])
def test_an_identifier_of_a_collection_not_configured_is_refused_as_any_other_without_a_token(
        make_client, picture, token):
    collections = {'Fish': 'fish'}
    client = make_client(REQUIRE_KEY_FOR_GET=True, COLLECTION_DIRS=collections)
    unknown = iiif.spelling('Birds', 'a.jpg')
    params = {'token': client.token('a.jpg')} if token else {}
    answer = client.get(f'/iiif/3/{unknown}/info.json', params, status=404 if token else 403)
    assert answer.text == ('No such image.' if token else 'Missing token.')


def test_an_identifier_naming_no_possible_attachment_is_404_before_any_token_is_asked_for(keyed):
    assert keyed.get('/iiif/3/.~wast-1.part/info.json', {}, status=404).text == 'No such image.'
