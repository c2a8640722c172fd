"""The IIIF Image API service, first step: the bare identifier's redirect, info.json and image requests
answered from the original (3.0 and 2.1), with the key when REQUIRE_KEY_FOR_GET asks for it."""

import json
import time

import pytest

from harness.images import make_image, with_exif
from test_thumbnails import decoded, pixel

BASE = 'http://assets.example.org:8080'


@pytest.fixture
def halves(tmp_path_factory):
    """A 400x300 PNG, its left half red and its right half blue."""
    return make_image(tmp_path_factory.mktemp('halves'), 'xc:red', '400x300', 'png',
                      '-fill', 'blue', '-draw', 'rectangle 200,0 399,299')


def near(data, tmp_path, x, y):
    """'red' or 'blue' for a pixel within 8 of pure red or blue (pyramids are stored as JPEG), else its colour."""
    red, green, blue = (int(float(n)) for n in pixel(data, tmp_path, x, y)[5:-1].split(',')[:3])
    if max(abs(red - 255), green, blue) <= 8:
        return 'red'
    return 'blue' if max(red, green, abs(blue - 255)) <= 8 else (red, green, blue)


def image(client, path, status=None, **params):
    return client.get(path, params, status=status)


# --- The bare identifier and info.json --------------------------------------------------------

@pytest.mark.parametrize('version', ['3', '2'])
def test_the_bare_identifier_redirects_303_to_its_info_json(client, halves, version):
    client.upload('sheet one.png', halves)
    answer = image(client, f'/iiif/{version}/sheet%20one.png', status=303)
    assert answer.headers['Location'] == f'{BASE}/iiif/{version}/sheet%20one.png/info.json'


def test_info_json_3_describes_the_image_service_at_the_public_base_url(client, halves):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/info.json')
    info = json.loads(answer.body)
    assert answer.content_type == 'application/json' and answer.headers['Access-Control-Allow-Origin'] == '*'
    assert (info['@context'], info['id'], info['type'], info['protocol'], info['profile']) == (
        'http://iiif.io/api/image/3/context.json', f'{BASE}/iiif/3/a.png', 'ImageService3',
        'http://iiif.io/api/image', 'level2')
    assert (info['width'], info['height'], info['maxWidth'], info['maxHeight']) == (400, 300, 4096, 4096)
    assert info['tiles'] == [{'width': 512, 'scaleFactors': [1]}]
    assert info['sizes'] == [{'width': 400, 'height': 300}]


def test_info_json_2_has_its_own_context_id_and_profile(client, halves):
    client.upload('a.png', halves)
    info = json.loads(image(client, '/iiif/2/a.png/info.json').body)
    assert (info['@context'], info['@id'], info['profile'][0]) == (
        'http://iiif.io/api/image/2/context.json', f'{BASE}/iiif/2/a.png', 'http://iiif.io/api/image/2/level2.json')


def test_info_json_is_json_ld_when_the_client_asks_for_it(client, halves):
    client.upload('a.png', halves)
    answer = client.get('/iiif/3/a.png/info.json', {}, headers={'Accept': 'application/ld+json'})
    assert answer.headers['Content-Type'] == 'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'


def test_a_large_image_offers_tiles_at_halving_scales_down_to_one_tile(client, tmp_path):
    client.upload('big.jpg', make_image(tmp_path, 'plasma:', '2100x1000', 'jpg'))
    info = json.loads(image(client, '/iiif/3/big.jpg/info.json').body)
    assert info['tiles'] == [{'width': 512, 'scaleFactors': [1, 2, 4, 8]}]
    assert info['sizes'][0] == {'width': 263, 'height': 125}


def test_an_image_turned_by_its_exif_orientation_is_described_as_shown(client, tmp_path):
    client.upload('turned.jpg', with_exif(make_image(tmp_path, 'plasma:', '300x200', 'jpg'), orientation=6))
    info = json.loads(image(client, '/iiif/3/turned.jpg/info.json').body)
    assert (info['width'], info['height']) == (200, 300)
    assert decoded(image(client, '/iiif/3/turned.jpg/full/max/0/default.jpg').body, tmp_path)[1:3] == (200, 300)


# --- Image requests ---------------------------------------------------------------------------

def test_the_full_image_at_max_is_the_image_as_a_jpeg(client, halves, tmp_path):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/full/max/0/default.jpg')
    assert answer.content_type == 'image/jpeg' and decoded(answer.body, tmp_path)[:3] == ('JPEG', 400, 300)


def test_a_region_is_cut_from_the_image(client, halves, tmp_path):
    client.upload('a.png', halves)
    left = image(client, '/iiif/3/a.png/0,0,200,300/max/0/default.png').body
    right = image(client, '/iiif/3/a.png/pct:50,0,50,100/max/0/default.png').body
    assert (near(left, tmp_path, 193, 150), near(right, tmp_path, 6, 150)) == ('red', 'blue')


@pytest.mark.parametrize('version, size, expected', [('3', '100,', (100, 75)), ('3', ',150', (200, 150)),
                                                     ('3', 'pct:25', (100, 75)), ('3', '!100,100', (100, 75)),
                                                     ('3', '50,50', (50, 50)), ('2', 'full', (400, 300)),
                                                     ('2', '200,', (200, 150))])
def test_a_size_is_answered_exactly(client, halves, tmp_path, version, size, expected):
    client.upload('a.png', halves)
    answer = image(client, f'/iiif/{version}/a.png/full/{size}/0/default.png')
    assert decoded(answer.body, tmp_path)[1:3] == expected


def test_square_is_the_centred_square_of_the_short_side(client, halves, tmp_path):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/square/max/0/default.png').body
    assert decoded(answer, tmp_path)[1:3] == (300, 300)
    assert (near(answer, tmp_path, 143, 10), near(answer, tmp_path, 156, 10)) == ('red', 'blue')


def test_mirroring_flips_left_and_right(client, halves, tmp_path):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/full/max/!0/default.png').body
    assert pixel(answer, tmp_path, 10, 10) == 'srgb(0,0,255)'


def test_a_quarter_turn_swaps_the_sides(client, halves, tmp_path):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/full/max/90/default.png').body
    assert decoded(answer, tmp_path)[1:3] == (300, 400)
    assert pixel(answer, tmp_path, 150, 10) == 'srgb(255,0,0)'          # the left half is now on top


def test_an_arbitrary_rotation_fits_the_turned_image_on_a_transparent_ground(client, halves, tmp_path):
    client.upload('a.png', halves)
    answer = image(client, '/iiif/3/a.png/full/max/45/default.png').body
    _kind, width, height, _colorspace, _depth, alpha = decoded(answer, tmp_path)[:6]
    assert (abs(width - 495) <= 2, abs(height - 495) <= 2, alpha) == (True, True, 'True')


@pytest.mark.parametrize('quality, colours', [('gray', {'gray(76)', 'gray(29)'}), ('bitonal', {'gray(0)'})])
def test_gray_and_bitonal_qualities(client, halves, tmp_path, quality, colours):
    client.upload('a.png', halves)
    answer = image(client, f'/iiif/3/a.png/full/max/0/{quality}.png').body
    assert {pixel(answer, tmp_path, 10, 10), pixel(answer, tmp_path, 390, 10)} == colours


@pytest.mark.parametrize('fmt, content_type, kind', [('png', 'image/png', 'PNG'), ('webp', 'image/webp', 'WEBP')])
def test_each_format_has_its_content_type(client, halves, tmp_path, fmt, content_type, kind):
    client.upload('a.png', halves)
    answer = image(client, f'/iiif/3/a.png/full/100,/0/default.{fmt}')
    assert (answer.content_type, decoded(answer.body, tmp_path)[0]) == (content_type, kind)


# --- Refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize('path', ['/iiif/3/a.png/full/max/0/default.gif', '/iiif/3/a.png/full/401,/0/default.jpg',
                                  '/iiif/3/a.png/0,0,0,10/max/0/default.jpg', '/iiif/3/a.png/full/max/NaN/default.jpg',
                                  '/iiif/3/a.png/full/max/0/fancy.jpg', '/iiif/3/a.png/full/99999999,/0/default.jpg',
                                  '/iiif/2/a.png/full/pct:0/0/default.jpg'])
def test_a_bad_parameter_is_400_with_cors(client, halves, path):
    client.upload('a.png', halves)
    answer = client.get(path, {}, status=400)
    assert answer.headers['Access-Control-Allow-Origin'] == '*' and 'Traceback' not in answer.text


def test_a_size_over_the_configured_maximum_is_refused_and_max_fits_within_it(make_client, halves, tmp_path):
    client = make_client(IIIF_MAX_SIZE=100)
    client.upload('a.png', halves)
    client.get('/iiif/3/a.png/full/101,/0/default.jpg', {}, status=400)
    assert decoded(image(client, '/iiif/3/a.png/full/max/0/default.jpg').body, tmp_path)[1:3] == (100, 75)
    assert json.loads(image(client, '/iiif/3/a.png/info.json').body)['maxWidth'] == 100


@pytest.mark.parametrize('path', ['/iiif/3/none.png/info.json', '/iiif/3/none.png/full/max/0/default.jpg',
                                  '/iiif/3/..%2Fa.png/info.json', '/iiif/3/.%2E/info.json'])
def test_an_identifier_naming_no_original_is_404(client, halves, path):
    client.upload('a.png', halves)
    client.get(path, {}, status=404)


def test_a_file_that_is_not_an_image_is_404(client):
    client.upload('notes.txt', b'field notes, not an image')
    client.get('/iiif/3/notes.txt/info.json', {}, status=404)


def test_a_corrupt_image_is_404_not_500(client):
    client.upload('broken.png', b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
    client.get('/iiif/3/broken.png/full/max/0/default.jpg', {}, status=404)


def test_with_collection_folders_the_identifier_names_collection_and_file(make_client, halves):
    client = make_client(COLLECTION_DIRS={'Fish': 'fish', 'Birds': 'birds'})
    client.upload('a.png', halves)
    identifier = 'RmlzaABhLnBuZw'                        # base64url of 'Fish\0a.png'
    info = json.loads(image(client, f'/iiif/3/{identifier}/info.json').body)
    assert info['id'] == f'{BASE}/iiif/3/{identifier}'
    client.get('/iiif/3/a.png/info.json', {}, status=404)


@pytest.mark.parametrize('path', ['/iiif/3/a.png', '/iiif/3/a.png/info.json', '/iiif/2/a.png/info.json',
                                  '/iiif/3/a.png/full/max/0/default.jpg', '/iiif/2/a.png/full/full/0/default.jpg',
                                  '/iiif/3/a.png/0,0,10,10/max/0/default.png', '/iiif/3/a.png/full/^max/0/default.jpg'])
def test_with_require_key_for_get_every_iiif_path_needs_a_token(make_client, halves, path):
    client = make_client(REQUIRE_KEY_FOR_GET=True)
    client.upload('a.png', halves)
    refused = client.get(path, {}, status=403)
    client.get(path, {'token': client.token('a.png')}, status=303 if path == '/iiif/3/a.png' else 200)
    assert b'\x89PNG' not in refused.body and b'\xff\xd8' not in refused.body


# --- The Presentation manifest ------------------------------------------------------------------

def test_info_json_3_links_its_manifest_as_part_of(client, halves):
    client.upload('a.png', halves)
    info = json.loads(image(client, '/iiif/3/a.png/info.json').body)
    assert info['partOf'] == [{'id': f'{BASE}/iiif/3/a.png/manifest', 'type': 'Manifest'}]


def test_the_manifest_has_one_canvas_painted_by_the_image_service(client, halves):
    client.upload('sheet one.png', halves)
    answer = image(client, '/iiif/3/sheet%20one.png/manifest')
    manifest = json.loads(answer.body)
    assert answer.content_type == 'application/json' and answer.headers['Access-Control-Allow-Origin'] == '*'
    assert (manifest['@context'], manifest['id'], manifest['type'], manifest['label']) == (
        'http://iiif.io/api/presentation/3/context.json', f'{BASE}/iiif/3/sheet%20one.png/manifest', 'Manifest',
        {'none': ['sheet one.png']})
    [canvas] = manifest['items']
    assert (canvas['type'], canvas['width'], canvas['height']) == ('Canvas', 400, 300)
    [page] = canvas['items']
    [painting] = page['items']
    assert (painting['motivation'], painting['target']) == ('painting', canvas['id'])
    body = painting['body']
    assert (body['id'], body['width'], body['height']) == (f'{BASE}/iiif/3/sheet%20one.png/full/max/0/default.jpg',
                                                           400, 300)
    assert body['service'] == [{'id': f'{BASE}/iiif/3/sheet%20one.png', 'type': 'ImageService3',
                                'profile': 'level2'}]


def test_the_manifest_of_a_missing_file_is_404(client):
    image(client, '/iiif/3/nothing.png/manifest', status=404)


# --- Viewer grants ------------------------------------------------------------------------------

@pytest.fixture
def keyed(make_client):
    return make_client(REQUIRE_KEY_FOR_GET=True)


def granted_base(client, name):
    """The service base a token-bearing info.json request hands a viewer."""
    info = json.loads(image(client, f'/iiif/3/{name}/info.json', token=client.token(name)).body)
    return info['id'][len(BASE):]


def test_a_token_lets_info_json_hand_the_viewer_a_granted_service(keyed, halves):
    keyed.upload('a.png', halves)
    base = granted_base(keyed, 'a.png')
    assert base.startswith('/iiif/grant/') and base.endswith('/3/a.png')
    assert image(keyed, base + '/full/100,/0/default.jpg').content_type == 'image/jpeg'


def test_a_grant_serves_only_the_image_it_was_made_for(keyed, halves):
    keyed.upload('a.png', halves)
    keyed.upload('b.png', halves)
    base = granted_base(keyed, 'a.png')
    image(keyed, base.replace('/a.png', '/b.png') + '/info.json', status=403)


def test_an_altered_grant_is_refused(keyed, halves):
    keyed.upload('a.png', halves)
    base = granted_base(keyed, 'a.png')
    expires, mac = base.split('/')[3].split('.')
    image(keyed, base.replace(mac, ('0' if mac[0] != '0' else '1') + mac[1:]) + '/info.json', status=403)
    image(keyed, base.replace(expires, str(int(expires) + 60)) + '/info.json', status=403)


def test_a_grant_expires_after_iiif_grant_seconds(make_client, halves):
    client = make_client(REQUIRE_KEY_FOR_GET=True, IIIF_GRANT_SECONDS=60)
    client.upload('a.png', halves)
    base = granted_base(client, 'a.png')
    client.app.clock = lambda: time.time() + 121
    answer = image(client, base + '/info.json', status=403)
    assert 'expired' in answer.text


def test_the_bare_identifier_with_a_token_redirects_to_a_granted_info_json(keyed, halves):
    keyed.upload('a.png', halves)
    answer = image(keyed, '/iiif/3/a.png', status=303, token=keyed.token('a.png'))
    assert answer.headers['Location'].startswith(f'{BASE}/iiif/grant/')
    assert answer.headers['Location'].endswith('/3/a.png/info.json')


def test_without_require_key_for_get_no_grant_is_made(client, halves):
    client.upload('a.png', halves)
    info = json.loads(image(client, '/iiif/3/a.png/info.json').body)
    assert info['id'] == f'{BASE}/iiif/3/a.png'
