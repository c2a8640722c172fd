"""The Docker image itself: built from the Dockerfile, run as its own CMD and USER (tests/podman_image.py), spoken
to as Specify does, and checked for what only the image can get wrong (user, writes, key, health check, names)."""

import os
import re
import secrets
import stat
import subprocess
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest

from harness.client import multipart_body
from harness.images import image_info, make_image, with_exif
from harness.podman import Container, ImageError, build, ensure_base, inspect, missing, snapshot
from harness.processes import PROJECT, wait_for
from test_thumbnails import TWO_PAGES, pdf
from names import pyramid_name
from tokens import make_token

pytestmark = pytest.mark.serial          # timed against the machine: run alone, not beside another worker


@pytest.fixture(scope='session')
def image(tmp_path_factory):
    """The project's image, built once per session (the base image is made only if the store lacks it)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    scratch = tmp_path_factory.mktemp('image')
    with open(os.path.join(PROJECT, 'Dockerfile')) as f:
        ensure_base(f.read(), scratch)
    build(scratch)
    return inspect()


def attachments_volume(image, folder):
    """A host folder for the image's VOLUME, owned by the image's USER as a named volume would be."""
    uid, gid = (int(part) for part in image['Config']['User'].split(':'))
    folder.mkdir()
    os.chown(folder, uid, gid)
    return folder


class Deployment:
    """One working container running the image as deployments configure it, and its root before it started."""

    def __init__(self, image, folder):
        self.key, self.name = secrets.token_hex(16), 'assets-' + secrets.token_hex(4)
        self.volume = attachments_volume(image, folder / 'attachments')
        self.container = Container(image)
        self.env = {'SERVER_NAME': self.name, 'SERVER_PORT': '8443', 'ATTACHMENT_KEY': self.key,
                    'DEBUG_MODE': 'true'}
        try:
            made = self.container.run(['true'])          # buildah makes its mount points now, not during the run
            if made.returncode != 0:
                raise ImageError(made.stderr)
            self.root = self.container.mount()
            self.before = snapshot(self.root)
            self.web = self.container.start(self.env, self.volume, folder / 'server.log')
        except BaseException:
            self.container.remove()
            raise

    def token(self, name):
        return make_token(self.key, name)

    def stop(self):
        try:
            self.web.stop()
        finally:
            self.container.remove()


@pytest.fixture(scope='session')
def deployed(image, tmp_path_factory):
    deployment = Deployment(image, tmp_path_factory.mktemp('deployed'))
    yield deployment
    deployment.stop()


@pytest.fixture
def launch(image, tmp_path):
    """Start the image in a fresh working container with these environment variables."""
    started = []

    def start(**env):
        container = Container(image)
        started.append((container, []))
        volume = attachments_volume(image, tmp_path / f'attachments{len(started)}')
        web = container.start(env, volume, tmp_path / f'server{len(started)}.log')
        started[-1][1].append(web)
        return web
    yield start
    for container, servers in started:
        try:
            for web in servers:
                web.stop()
        finally:
            container.remove()


def upload(web, key, name, data, coll='Fish'):
    """POST /fileupload as Specify 7 does: the file part first, then store, type, coll and token."""
    content_type, body = multipart_body([('file', 'blob', data), ('store', name), ('type', 'O'), ('coll', coll),
                                         ('token', make_token(key, name))])
    return web.request('POST', '/fileupload', body, {'Content-Type': content_type})


def fileget(web, key, name, **params):
    query = {'filename': name, 'coll': 'Fish', 'type': 'O', 'token': make_token(key, name), **params}
    return web.request('GET', '/fileget?' + urlencode(query))


def unique(suffix):
    return f'{secrets.token_hex(6)}.{suffix}'


# --- The client flow against the running image ----------------------------------------------------

def test_discovery_gives_server_name_and_server_port_as_the_public_address(deployed):
    status, _, body = deployed.web.request('GET', '/web_asset_store.xml')
    urls = {url.get('type'): url.text for url in ET.fromstring(body).iter('url')}
    assert status == 200
    assert urls['read'] == f'http://{deployed.name}:8443/fileget'
    assert urls['write'] == f'http://{deployed.name}:8443/fileupload'


def test_tokens_are_checked_with_attachment_key(deployed):
    signed = {'random': '7', 'token': deployed.token('7')}
    other = {'random': '7', 'token': make_token('not-' + deployed.key, '7')}
    assert deployed.web.request('GET', '/testkey?' + urlencode(signed))[:3:2] == (200, b'Ok.')
    assert deployed.web.request('GET', '/testkey?' + urlencode(other))[0] == 403


def test_debug_mode_true_logs_at_debug_level(deployed):
    assert re.search(r'^\S+ \S+ DEBUG ', deployed.web.output(), re.M)


def test_an_upload_is_kept_in_the_volume_and_read_back_unchanged(deployed, jpeg):
    name = unique('jpg')
    assert upload(deployed.web, deployed.key, name, jpeg)[:3:2] == (200, b'Ok.')
    status, headers, body = fileget(deployed.web, deployed.key, name)
    assert (status, headers['Content-Type'], body) == (200, 'image/jpeg', jpeg)
    stored = deployed.volume / 'originals' / name
    assert stored.read_bytes() == jpeg and stored.stat().st_uid == 999


def sample(kind, tmp_path):
    """Sample bytes of a collection format: 600x400 pictures, a 200x300 pt two-page PDF."""
    if kind == 'pdf':
        return pdf(tmp_path, TWO_PAGES)
    if kind == 'heic':
        (tmp_path / 'phone.jpg').write_bytes(make_image(tmp_path, 'plasma:', '600x400', 'jpg'))
        subprocess.run(['heif-enc', '-q', '40', str(tmp_path / 'phone.jpg'), '-o', str(tmp_path / 'phone.heic')],
                       check=True, capture_output=True, timeout=120)
        return (tmp_path / 'phone.heic').read_bytes()
    return make_image(tmp_path, 'plasma:', '600x400', kind)


@pytest.mark.parametrize('kind, expected', [('jpg', ('JPEG', 123, 82)), ('png', ('PNG', 123, 82)),
                                            ('tif', ('PNG', 123, 82)), ('pdf', ('PNG', 82, 123)),
                                            ('heic', ('PNG', 123, 82))])
def test_the_image_makes_thumbnails_of_every_collection_format(deployed, tmp_path, kind, expected):
    name = unique(kind)
    assert upload(deployed.web, deployed.key, name, sample(kind, tmp_path))[0] == 200
    status, _, thumbnail = fileget(deployed.web, deployed.key, name, type='T', scale='123')
    assert status == 200, thumbnail
    assert image_info(thumbnail, tmp_path) == expected


@pytest.mark.parametrize('kind', ['jpg', 'tif', 'pdf', 'heic'])
def test_the_image_serves_iiif_tiles_cut_from_a_pyramid_in_the_volume(deployed, tmp_path, kind):
    name = unique(kind)
    assert upload(deployed.web, deployed.key, name, sample(kind, tmp_path))[0] == 200
    status, _, tile = deployed.web.request('GET', f'/iiif/3/{name}/full/100,/0/default.jpg')
    assert (status, image_info(tile, tmp_path)[:2]) == (200, ('JPEG', 100)), tile[:200]
    assert (deployed.volume / 'thumbnails' / pyramid_name(name)).stat().st_uid == 999


def test_a_delete_removes_the_original_from_the_volume(deployed, png):
    name = unique('png')
    upload(deployed.web, deployed.key, name, png)
    form = urlencode({'filename': name, 'coll': 'Fish', 'token': deployed.token(name)})
    answer = deployed.web.request('POST', '/filedelete', form, {'Content-Type': 'application/x-www-form-urlencoded'})
    assert answer[:3:2] == (200, b'Ok.')
    assert not (deployed.volume / 'originals' / name).exists()
    assert fileget(deployed.web, deployed.key, name)[0] == 404


def test_getmetadata_reads_the_exif_date_of_an_upload(deployed, jpeg):
    name = unique('jpg')
    upload(deployed.web, deployed.key, name, with_exif(jpeg, date='2021:03:04 05:06:07'))
    query = {'filename': name, 'coll': 'Fish', 'dt': 'date', 'token': deployed.token(name)}
    assert deployed.web.request('GET', '/getmetadata?' + urlencode(query))[:3:2] == (200, b'2021:03:04 05:06:07')


# --- What only the image can get wrong ------------------------------------------------------------

def test_the_server_process_runs_as_uid_and_gid_999(deployed):
    with open(f'/proc/{deployed.web.pid()}/status') as f:
        status = dict(line.split(':', 1) for line in f.read().splitlines())
    assert status['Uid'].split() == ['999'] * 4
    assert status['Gid'].split() == ['999'] * 4


def test_the_server_writes_nothing_outside_its_volume(deployed, tmp_path):
    for kind in ('jpg', 'pdf', 'heic'):          # ImageMagick, Ghostscript and libheif at work
        name = unique(kind)
        upload(deployed.web, deployed.key, name, sample(kind, tmp_path))
        assert fileget(deployed.web, deployed.key, name, type='T', scale='64')[0] == 200
    after = snapshot(deployed.root)
    changed = sorted(path for path in set(after) | set(deployed.before) if after.get(path) != deployed.before.get(path))
    assert changed == []


@pytest.fixture
def keyless(launch):
    """The image started as `docker run` without ATTACHMENT_KEY or KEY."""
    return launch(SERVER_NAME='keyless-' + secrets.token_hex(4))


def test_a_generated_key_is_kept_in_the_volume_readable_only_by_the_server_user(keyless):
    kept = keyless.volume / '.web-asset-server.key'
    info = kept.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 999, 999)
    key = kept.read_text().strip()
    query = urlencode({'random': '1', 'token': make_token(key, '1')})
    assert keyless.request('GET', '/testkey?' + query)[0] == 200


def test_a_generated_key_never_appears_in_the_log(keyless):
    key = (keyless.volume / '.web-asset-server.key').read_text().strip()
    assert '.web-asset-server.key' in keyless.output()
    assert key not in keyless.output()


def test_the_images_own_healthcheck_passes_inside_the_container(deployed):
    check = deployed.container.healthcheck['Test']
    command = check[1:] if check[0] == 'CMD' else ['/bin/sh', '-c', check[1]]
    asked = deployed.web.output().count('GET /health 200')
    done = deployed.container.run(command, env=deployed.web.env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: deployed.web.output().count('GET /health 200') > asked, 10)


def test_s3_storage_from_inside_the_image_keeps_uploads_in_the_bucket(launch, seaweed, jpeg):
    prefix = 'image-' + secrets.token_hex(6)
    web = launch(SERVER_NAME='s3-' + secrets.token_hex(4), ATTACHMENT_KEY='s3-key', **seaweed.settings(prefix))
    name = unique('jpg')
    assert upload(web, 's3-key', name, jpeg)[:3:2] == (200, b'Ok.')
    assert fileget(web, 's3-key', name)[:3:2] == (200, jpeg)
    kept = seaweed.client().get_object(Bucket=seaweed.bucket, Key=f'{prefix}/originals/{name}')
    assert kept['Body'].read() == jpeg
    assert not (web.volume / 'originals').exists()


# --- Failures are reported with the tools' own messages -------------------------------------------

def test_a_bad_setting_fails_the_start_with_the_servers_own_message(launch):
    with pytest.raises(ImageError, match='cannot start.*THREADS'):
        launch(SERVER_NAME='bad-' + secrets.token_hex(4), THREADS='many')


def test_a_failing_build_step_fails_with_the_build_tools_message(image, tmp_path):
    (tmp_path / 'Dockerfile').write_text(f'FROM {image["Id"]}\nUSER 0\nRUN echo step-output-7 >&2; exit 7\n')
    with pytest.raises(ImageError, match='(?s)step-output-7.*exit status 7'):
        build(tmp_path, context=tmp_path, tag='localhost/web-asset-server:broken')
