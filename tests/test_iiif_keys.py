"""REQUIRE_KEY_FOR_GET and IIIF: no path lets a pixel out without a valid token or viewer grant.

A table of every kind of IIIF request (info.json, the bare identifier, the 3.0 manifest, tiles, the full
region, `max`, upscaled and pct: sizes, rotations, qualities, formats), 3.0 and 2.1 both, asked on the plain
/iiif/... with no token or a bad one, and under /iiif/grant/{grant}/... with a bad grant: each is a 403 in
plain text, given before any work, so it tells nothing of the image, not even whether it exists. The same
table is served with a valid token, and under the grant info.json hands out.
"""

import json
import time

import pytest

import iiif
from harness.client import KEY
from harness.images import make_image
from tokens import make_token

BASE = 'http://assets.example.org:8080'
NAME, OTHER = 'sheet.jpg', 'other.jpg'
MAX_SIZE = 1400                  # IIIF_MAX_SIZE here: upscaling is offered, and ^max is 1400 px wide

JPEG, PNG, WEBP = 'image/jpeg', 'image/png', 'image/webp'
MAGIC = {JPEG: b'\xff\xd8\xff', PNG: b'\x89PNG\r\n\x1a\n', WEBP: b'RIFF'}
INFO, MANIFEST, REDIRECT = 'info.json', 'manifest', 'redirect'

# Each path after /iiif/{version}/{identifier}, and what it answers when let in, on a 700x500 image
# (tiles of 512 at scale factors 1 and 2).
PATHS = {
    '3': {'the bare identifier': ('', REDIRECT),
          'info.json': ('/info.json', INFO),
          'the manifest': ('/manifest', MANIFEST),
          'a tile': ('/512,0,188,500/188,/0/default.jpg', JPEG),
          'a tile at scale factor 2': ('/0,0,700,500/350,/0/default.jpg', JPEG),
          'the full region at max': ('/full/max/0/default.jpg', JPEG),
          '^max': ('/full/^max/0/default.jpg', JPEG),
          'an upscaled width': ('/full/^1400,/0/default.jpg', JPEG),
          'an upscaled best fit': ('/full/^!1400,1400/0/default.jpg', JPEG),
          'a pct: size': ('/full/pct:50/0/default.jpg', JPEG),
          'an upscaled pct: size': ('/full/^pct:150/0/default.jpg', JPEG),
          'a pct: region': ('/pct:10,10,50,50/max/0/default.jpg', JPEG),
          'the square region': ('/square/max/0/default.jpg', JPEG),
          'a quarter turn': ('/full/max/90/default.jpg', JPEG),
          'mirrored': ('/full/max/!0/default.jpg', JPEG),
          'an arbitrary rotation': ('/full/max/22.5/default.jpg', JPEG),
          'gray': ('/full/max/0/gray.jpg', JPEG),
          'bitonal': ('/full/max/0/bitonal.png', PNG),
          'color': ('/full/max/0/color.jpg', JPEG),
          'png': ('/full/max/0/default.png', PNG),
          'webp': ('/full/max/0/default.webp', WEBP)},
    '2': {'the bare identifier': ('', REDIRECT),
          'info.json': ('/info.json', INFO),
          'a tile': ('/512,0,188,500/188,/0/default.jpg', JPEG),
          'a tile at scale factor 2': ('/0,0,700,500/350,/0/default.jpg', JPEG),
          'the full region at full': ('/full/full/0/default.jpg', JPEG),
          'the full region at max': ('/full/max/0/default.jpg', JPEG),
          'a size above full': ('/full/1400,/0/default.jpg', JPEG),
          'a best fit above full': ('/full/!1400,1400/0/default.jpg', JPEG),
          'a pct: size': ('/full/pct:50/0/default.jpg', JPEG),
          'a pct: size above full': ('/full/pct:150/0/default.jpg', JPEG),
          'a pct: region': ('/pct:10,10,50,50/full/0/default.jpg', JPEG),
          'the square region': ('/square/full/0/default.jpg', JPEG),
          'a quarter turn': ('/full/full/90/default.jpg', JPEG),
          'mirrored': ('/full/full/!0/default.jpg', JPEG),
          'an arbitrary rotation': ('/full/full/22.5/default.jpg', JPEG),
          'gray': ('/full/full/0/gray.jpg', JPEG),
          'bitonal': ('/full/full/0/bitonal.png', PNG),
          'color': ('/full/full/0/color.jpg', JPEG),
          'png': ('/full/full/0/default.png', PNG),
          'webp': ('/full/full/0/default.webp', WEBP)},
}
EVERY_PATH = [(version, label, path) for version, table in PATHS.items() for label, (path, _kind) in table.items()]
REFUSED = (403, 'text/plain', False)


class StillClock:
    """A server's clock that stands at the time it was made until a test moves it."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture(scope='module')
def sheet(tmp_path_factory):
    """A 700x500 JPEG: two tiles wide at full size, one at half."""
    return make_image(tmp_path_factory.mktemp('sheet'), 'gradient:red-blue', '700x500', 'jpg')


@pytest.fixture
def keyed(make_client, sheet):
    """A server with REQUIRE_KEY_FOR_GET holding the sheet and another image; its clock held still, so that the
    grants it mints during one test are one (a grant's expiry is rounded up to a whole minute)."""
    client = make_client(REQUIRE_KEY_FOR_GET=True, IIIF_MAX_SIZE=MAX_SIZE)
    client.app.clock = StillClock()
    client.upload(NAME, sheet)
    client.upload(OTHER, sheet)
    return client


def ask(client, path, **params):
    return client.get(path, params, status='*')


def shows_a_pixel(answer):
    """Whether an answer carries image bytes of a format served, anywhere in it."""
    return any(magic in answer.body for magic in MAGIC.values())


def refusal(answer):
    return answer.status_int, answer.content_type, shows_a_pixel(answer)


def plain(version):
    return '/iiif'


def refusals(client, prefix=plain, name=NAME, **params):
    """{(version, path's label): (status, content type, whether it shows a pixel)} of the whole table;
    prefix(version) is what comes before /{version}/{name}."""
    return {(version, label): refusal(ask(client, f'{prefix(version)}/{version}/{name}{path}', **params))
            for version, label, path in EVERY_PATH}


def everywhere(outcome):
    return {(version, label): outcome for version, label, _path in EVERY_PATH}


def handed_grant(client, version, name=NAME, identifier=None):
    """The grant in the service id that info.json gives a request carrying a valid token for `name`."""
    identifier = identifier or name
    info = json.loads(ask(client, f'/iiif/{version}/{identifier}/info.json', token=client.token(name)).body)
    service = info.get('id') or info['@id']
    start = f'{BASE}/iiif/grant/'
    assert service.startswith(start) and service.endswith(f'/{version}/{identifier}'), service
    return service[len(start):].split('/')[0]


def altered(text, at):
    """`text` with the character at `at` (negative: from the end) replaced by another digit."""
    at %= len(text)
    return text[:at] + ('1' if text[at] == '0' else '0') + text[at + 1:]


# --- Without a valid token -----------------------------------------------------------------------

def beyond_tolerance(direction):
    def token(client):
        return make_token(KEY, NAME, int(time.time()) + direction * (client.config.TIME_TOLERANCE + 5))
    return token


BAD_TOKENS = {'no token': None,
              'an empty token': lambda client: '',
              'a malformed token': lambda client: 'not-a-token',
              "another name's token": lambda client: client.token(OTHER),
              'an altered token': lambda client: altered(client.token(NAME), 0),
              'an expired token': beyond_tolerance(-1),
              "a token from beyond the clock's tolerance ahead": beyond_tolerance(+1)}


@pytest.mark.parametrize('case', BAD_TOKENS)
def test_without_a_valid_token_every_iiif_path_is_403_in_plain_text_with_no_pixel(keyed, case):
    make = BAD_TOKENS[case]
    params = {} if make is None else {'token': make(keyed)}
    assert refusals(keyed, **params) == everywhere(REFUSED)


def test_the_refusal_says_why_in_a_short_text_with_cors(keyed):
    answer = ask(keyed, f'/iiif/3/{NAME}/full/max/0/default.jpg', token=keyed.token(OTHER))
    assert (answer.status_int, answer.text, answer.headers['Access-Control-Allow-Origin']) == (403, 'Bad token.', '*')


def test_a_head_request_without_a_token_is_403_too(keyed):
    answers = {path: keyed.web.head(path, expect_errors=True).status_int
               for path in (f'/iiif/3/{NAME}/info.json', f'/iiif/2/{NAME}/0,0,512,500/512,/0/default.jpg',
                            f'/iiif/3/{NAME}/full/max/0/default.jpg')}
    assert answers == dict.fromkeys(answers, 403)


def test_without_a_token_a_missing_file_is_refused_exactly_as_an_existing_one(keyed):
    answers = {}
    for version, label, path in EVERY_PATH:
        missing = ask(keyed, f'/iiif/{version}/absent.jpg{path}')
        existing = ask(keyed, f'/iiif/{version}/{NAME}{path}')
        answers[version, label] = (refusal(missing), missing.body == existing.body)
    assert answers == everywhere((REFUSED, True))


def test_without_a_token_a_corrupt_file_and_one_no_image_are_refused_before_they_are_read(keyed):
    keyed.upload('broken.jpg', b'\xff\xd8\xff\xe0' + b'\0' * 64)
    keyed.upload('notes.txt', b'field notes, not an image')
    for name in ('broken.jpg', 'notes.txt'):
        assert ask(keyed, f'/iiif/3/{name}/info.json', token=keyed.token(name)).status_int == 404
        assert refusals(keyed, name=name) == everywhere(REFUSED)


# --- Under a grant that is not valid for this image ----------------------------------------------

def malformed(client, version):
    return 'not-a-grant'


def uppercase(client, version):
    return handed_grant(client, version).upper()


def without_expiry(client, version):
    return handed_grant(client, version).split('.')[1]


def altered_mac(client, version):
    return altered(handed_grant(client, version), -1)


def earlier_expiry(client, version):
    """The grant's expiry a minute earlier: still ahead, so only its MAC can refuse it."""
    expires, mac = handed_grant(client, version).split('.')
    return f'{int(expires) - 60}.{mac}'


def other_images(client, version):
    return handed_grant(client, version, OTHER)


BAD_GRANTS = {'a malformed grant': malformed, 'a grant in capitals': uppercase,
              'a grant without its expiry': without_expiry, 'a grant with an altered MAC': altered_mac,
              'a grant with an altered expiry': earlier_expiry, "another image's grant": other_images}


def under(grants):
    return lambda version: f'/iiif/grant/{grants[version]}'


@pytest.mark.parametrize('case', BAD_GRANTS)
def test_under_a_grant_not_valid_for_this_image_every_iiif_path_is_403_with_no_pixel(keyed, case):
    grants = {version: BAD_GRANTS[case](keyed, version) for version in PATHS}
    assert refusals(keyed, under(grants)) == everywhere(REFUSED)


def test_once_its_grant_has_expired_every_iiif_path_is_403_with_no_pixel(keyed):
    grants = {version: handed_grant(keyed, version) for version in PATHS}
    keyed.app.clock.now = max(int(grant.split('.')[0]) for grant in grants.values())
    assert refusals(keyed, under(grants)) == everywhere(REFUSED)


def test_a_valid_token_does_not_stand_in_for_a_bad_grant(keyed):
    grants = {version: other_images(keyed, version) for version in PATHS}
    assert refusals(keyed, under(grants), token=keyed.token(NAME)) == everywhere(REFUSED)


def test_a_grant_path_with_its_grant_left_out_is_no_service_and_shows_no_pixel(keyed):
    assert refusals(keyed, lambda version: '/iiif/grant/') == everywhere((404, 'text/plain', False))


def test_under_a_forged_grant_a_missing_file_is_refused_exactly_as_an_existing_one(keyed):
    forged = {version: altered_mac(keyed, version) for version in PATHS}
    answers = {}
    for version, label, path in EVERY_PATH:
        missing = ask(keyed, f'/iiif/grant/{forged[version]}/{version}/absent.jpg{path}')
        existing = ask(keyed, f'/iiif/grant/{forged[version]}/{version}/{NAME}{path}')
        answers[version, label] = (refusal(missing), missing.body == existing.body)
    assert answers == everywhere((REFUSED, True))


def test_a_grant_for_one_collections_file_does_not_open_the_same_name_in_another(make_client, sheet):
    collections = {'Fish': 'fish', 'Birds': 'birds'}
    client = make_client(REQUIRE_KEY_FOR_GET=True, COLLECTION_DIRS=collections)
    client.upload('a.jpg', sheet, coll='Fish')
    client.upload('a.jpg', sheet, coll='Birds')
    fish, birds = (iiif.identifier_for(coll, 'a.jpg', collections) for coll in ('Fish', 'Birds'))
    grant = handed_grant(client, '3', 'a.jpg', fish)
    assert ask(client, f'/iiif/grant/{grant}/3/{fish}/full/max/0/default.jpg').status_int == 200
    assert refusal(ask(client, f'/iiif/grant/{grant}/3/{birds}/full/max/0/default.jpg')) == REFUSED


# --- Let in --------------------------------------------------------------------------------------

def served(client, version, prefix='/iiif', **params):
    """{path's label: what it answered}: the redirect's target, a JSON document's kind and id, or an image's
    status, type and whether its bytes begin as that type's do."""
    found = {}
    for label, (path, _kind) in PATHS[version].items():
        answer = ask(client, f'{prefix}/{version}/{NAME}{path}', **params)
        if answer.status_int == 303:
            found[label] = (REDIRECT, answer.headers['Location'])
        elif answer.status_int == 200 and answer.content_type == 'application/json':
            document = json.loads(answer.body)
            found[label] = (MANIFEST if document.get('type') == 'Manifest' else INFO,
                            document.get('id') or document.get('@id'))
        else:
            found[label] = (answer.status_int, answer.content_type,
                            answer.body.startswith(MAGIC.get(answer.content_type, b'\0')))
    return found


def expected(version, base):
    """What served() finds when every path is let in, the service's id being `base`."""
    found = {}
    for label, (_path, kind) in PATHS[version].items():
        if kind == REDIRECT:
            found[label] = (REDIRECT, f'{base}/info.json')
        elif kind == INFO:
            found[label] = (INFO, base)
        elif kind == MANIFEST:
            found[label] = (MANIFEST, f'{base}/manifest')
        else:
            found[label] = (200, kind, True)
    return found


@pytest.mark.parametrize('version', ['3', '2'])
def test_with_a_valid_token_every_iiif_path_is_served(keyed, version):
    grant = handed_grant(keyed, version)
    found = served(keyed, version, token=keyed.token(NAME))
    assert found == expected(version, f'{BASE}/iiif/grant/{grant}/{version}/{NAME}')


@pytest.mark.parametrize('version', ['3', '2'])
def test_with_the_grant_info_json_hands_out_every_iiif_path_is_served_without_a_token(keyed, version):
    prefix = '/iiif/grant/' + handed_grant(keyed, version)
    assert served(keyed, version, prefix=prefix) == expected(version, f'{BASE}{prefix}/{version}/{NAME}')
