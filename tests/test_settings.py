"""Settings keep the existing server's names, read typed environment variables, and never fall back to a known key."""

import logging
import os
import stat

import pytest

import server
from harness.client import KEY
from config import ConfigError, load_config
from engines.imagemagick import find_imagemagick, version_text
import tokens
from tokens import make_token, resolve_key

pytestmark = pytest.mark.disk_only


def test_environment_variables_are_read_with_the_settings_types(tmp_path):
    config = load_config(environ={
        'PORT': '9090', 'REQUIRE_KEY_FOR_GET': 'true', 'ALLOW_STATIC_FILE_ACCESS': 'no',
        'TIME_TOLERANCE': 'none', 'NO_TIME_WINDOW_ACKNOWLEDGED': 'true', 'COLLECTION_DIRS': '{"Fish": "fish"}', 'BASE_DIR': str(tmp_path),
        'SERVER_NAME': 'assets.museum.org', 'SERVER_PORT': '443', 'MAX_UPLOAD_SIZE': '1000',
        'MAX_THUMBNAIL_SCALE': '600', 'PUBLIC_SCHEME': 'https', 'TRUST_PROXY_HEADERS': '1'})
    assert (config.PORT, config.REQUIRE_KEY_FOR_GET, config.ALLOW_STATIC_FILE_ACCESS) == (9090, True, False)
    assert (config.TIME_TOLERANCE, config.COLLECTION_DIRS) == (None, {'Fish': 'fish'})
    assert (config.SERVER_NAME, config.SERVER_PORT, config.PUBLIC_SCHEME) == ('assets.museum.org', 443, 'https')
    assert (config.MAX_UPLOAD_SIZE, config.MAX_THUMBNAIL_SCALE, config.TRUST_PROXY_HEADERS) == (1000, 600, True)
    assert config.BASE_DIR == str(tmp_path)


def test_docker_names_attachment_key_and_debug_mode_are_read():
    config = load_config(environ={'ATTACHMENT_KEY': 'from-docker', 'DEBUG_MODE': 'true'})
    assert (config.KEY, config.DEBUG) == ('from-docker', True)


def test_key_wins_over_attachment_key_when_both_are_set():
    assert load_config(environ={'ATTACHMENT_KEY': 'alias', 'KEY': 'own'}).KEY == 'own'


def test_server_port_defaults_to_the_listen_port():
    assert load_config(environ={'PORT': '8181'}).SERVER_PORT == 8181


def test_relative_base_dir_is_taken_from_the_project_folder():
    config = load_config(environ={'BASE_DIR': 'attachments'})
    assert config.BASE_DIR == os.path.join(os.path.dirname(os.path.abspath(server.__file__)), 'attachments')


@pytest.mark.parametrize('name, value', [('REQUIRE_KEY_FOR_GET', 'maybe'), ('PORT', 'eighty'),
                                         ('PORT', '0'), ('COLLECTION_DIRS', '{broken'),
                                         ('COLLECTION_DIRS', '{"Fish": "../elsewhere"}'),
                                         ('COLLECTION_DIRS', '["fish"]'), ('PUBLIC_SCHEME', 'ftp'),
                                         ('THUMB_DIR', '../thumbs')])
def test_a_bad_setting_stops_the_start_with_its_name(name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(environ={name: value})


def test_without_a_key_a_random_one_is_made_and_kept_beside_the_attachments(make_client, jpeg, caplog):
    caplog.set_level(logging.INFO, logger='web_asset_server')
    client = make_client(KEY=None)
    key_file = client.path('.web-asset-server.key')
    key = open(key_file).read().strip()
    assert len(key) >= 32 and key != KEY
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert key_file in caplog.text and 'ASSET_SERVER_KEY' in caplog.text
    assert key not in caplog.text
    client.upload('a.jpg', jpeg, token='', status=403)
    client.upload('a.jpg', jpeg, token=make_token(key, 'a.jpg'))


def test_the_kept_key_survives_a_restart(make_client):
    first = make_client(KEY=None)
    second = make_client(KEY=None)
    assert first.app.key == second.app.key


@pytest.mark.parametrize('content', ['', ' \n\t\n'])
def test_an_empty_key_file_stops_the_start_with_a_message_naming_it_and_is_left_as_it_is(make_client, content):
    key_file = make_client().path('.web-asset-server.key')
    with open(key_file, 'w') as f:
        f.write(content)
    with pytest.raises(ConfigError, match='key file ' + key_file + ' is empty'):
        make_client(KEY=None)
    with open(key_file) as f:
        assert f.read() == content


def test_a_new_key_files_folder_is_fsynced_once_the_file_holds_the_key(make_client, monkeypatch):
    synced = []

    def fsync_folder(folder):
        key_file = os.path.join(folder, '.web-asset-server.key')
        synced.append((folder, open(key_file).read() if os.path.exists(key_file) else None))
    monkeypatch.setattr(tokens, 'fsync_folder', fsync_folder)
    client = make_client(KEY=None)
    assert (client.base, client.app.key + '\n') in synced


def test_an_instance_starting_while_another_makes_the_key_file_uses_the_same_key(tmp_path, monkeypatch):
    config = load_config({'BASE_DIR': str(tmp_path), 'KEY': None}, environ={})
    real_open, other = os.open, []

    def open_then_start_another(path, flags, *mode):
        descriptor = real_open(path, flags, *mode)
        if flags & os.O_CREAT and not other:         # the first instance has just made a file of its own
            other.append(None)
            other[0] = resolve_key(config)
        return descriptor
    monkeypatch.setattr(os, 'open', open_then_start_another)
    assert resolve_key(config) == other[0]
    assert os.listdir(tmp_path) == ['.web-asset-server.key']


def test_a_key_file_on_a_file_system_without_hard_links_stops_the_start_with_a_message(tmp_path, monkeypatch):
    config = load_config({'BASE_DIR': str(tmp_path), 'KEY': None}, environ={})

    def no_links(source, target):
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(os, 'link', no_links)
    with pytest.raises(ConfigError, match='cannot keep a new key in .*Operation not permitted.*set KEY'):
        resolve_key(config)
    assert os.listdir(tmp_path) == []


def test_auth_disabled_warns_at_every_start(make_client, caplog):
    for _ in range(2):
        make_client(KEY=None, AUTH_DISABLED=True)
    assert caplog.text.count('AUTH_DISABLED') == 2


def test_the_configured_key_is_never_logged(make_client, jpeg, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(ACCESS_LOG=True)
    client.upload('a.jpg', jpeg)
    client.get('/testkey', {'random': '1', 'token': client.token('1')})
    assert caplog.text and KEY not in caplog.text


def test_access_log_has_one_line_per_request_without_tokens(make_client, jpeg, caplog):
    caplog.set_level(logging.INFO, logger='web_asset_server')
    client = make_client(ACCESS_LOG=True)
    client.upload('a.jpg', jpeg)
    client.fileget('a.jpg', token=client.token('a.jpg'))
    client.fileget('missing.jpg', status=404)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('127.0.0.1')
             or ' /file' in r.getMessage()]
    assert len(lines) == 3
    assert 'POST /fileupload 200' in lines[0] and 'GET /fileget 404' in lines[2]
    assert not any('token' in line for line in lines)


def fake_program(folder, name, says):
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{says}"\n')
    path.chmod(0o755)
    return path


def test_a_convert_earlier_on_path_that_is_not_imagemagick_is_passed_over(tmp_path, monkeypatch):
    fake_program(tmp_path, 'convert', 'convert: not the program you are looking for')
    monkeypatch.setenv('PATH', f'{tmp_path}:/usr/bin:/bin')
    found = find_imagemagick.__wrapped__(None)
    assert found != str(tmp_path / 'convert') and 'ImageMagick' in version_text(found, '-version')


def test_a_named_program_that_is_not_imagemagick_stops_the_start_clearly(tmp_path):
    fake = fake_program(tmp_path, 'magick', 'Version: GraphicsMagick')
    with pytest.raises(ConfigError, match='ImageMagick was not found'):
        find_imagemagick.__wrapped__(str(fake))


def test_a_wrapper_script_is_passed_over_for_the_native_binary(tmp_path, monkeypatch):
    real = find_imagemagick(None)
    wrapper = tmp_path / 'convert'
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:{os.path.dirname(real)}')
    assert find_imagemagick.__wrapped__(None) == real


def test_fewer_than_five_threads_is_refused():
    with pytest.raises(ConfigError, match='THREADS'):
        load_config(environ={'THREADS': '4'})


def test_control_characters_in_a_path_cannot_forge_log_lines(make_client, caplog):
    caplog.set_level(logging.INFO, logger='web_asset_server')
    client = make_client(ACCESS_LOG=True)
    client.web.get('/static/originals/a%0A127.0.0.1 GET /forged 200', status=404)
    assert not any(record.getMessage().startswith('127.0.0.1 GET /forged') for record in caplog.records)
    assert '\\x0a' in caplog.text


def test_access_log_escapes_control_characters_in_the_method(make_client, caplog):
    caplog.set_level(logging.INFO, logger='web_asset_server')
    client = make_client(ACCESS_LOG=True)
    client.unlinted.request('/', method='GET\x1b[2J\x00', expect_errors=True)
    assert 'GET\\x1b[2J\\x00 / ' in caplog.text
    assert '\x1b' not in caplog.text and '\x00' not in caplog.text


@pytest.mark.parametrize('text, scales', [('1000,123', [1000, 123]), ('[123, 1000]', [1000, 123]), ('123', [123]),
                                          ('none', [])])
def test_pregenerate_scale_takes_a_number_or_a_list_largest_first(tmp_path, text, scales):
    config = load_config(environ={'PREGENERATE_SCALE': text, 'BASE_DIR': str(tmp_path)})
    assert config.PREGENERATE_SCALES == scales


@pytest.mark.parametrize('text', ['0', '1000,3000', '[1.5]', 'big'])
def test_a_pregenerate_scale_outside_1_to_max_thumbnail_scale_stops_the_start(tmp_path, text):
    with pytest.raises(ConfigError, match='PREGENERATE_SCALE'):
        load_config(environ={'PREGENERATE_SCALE': text, 'BASE_DIR': str(tmp_path)})


@pytest.mark.parametrize('created', [1764640000.0, 1764640000.123, 1764640000.999, 1764640001.5])
def test_log_lines_carry_the_time_to_the_millisecond_as_the_standard_formatter_writes_it(created):
    """The server's log format formats the date once a second, but each record keeps its own milliseconds."""
    ours, standard = server.LogFormat('%(asctime)s %(message)s'), logging.Formatter('%(asctime)s %(message)s')
    earlier = logging.makeLogRecord({'msg': 'before', 'created': int(created), 'msecs': 0.0})
    record = logging.makeLogRecord({'msg': 'GET /health 200', 'created': created,
                                    'msecs': (created - int(created)) * 1000})
    ours.format(earlier)                    # the same second, formatted first
    assert ours.format(record) == standard.format(record)


@pytest.mark.parametrize('folder', ['originals', 'thumbnails', 'shared'])
def test_the_server_refuses_to_start_with_originals_and_thumbnails_in_one_folder(tmp_path, folder):
    with pytest.raises(ConfigError, match='ORIG_DIR and THUMB_DIR must name different folders'):
        load_config({'BASE_DIR': str(tmp_path), 'ORIG_DIR': folder, 'THUMB_DIR': folder}, environ={})


@pytest.mark.parametrize('setting', ['ORIG_DIR', 'THUMB_DIR'])
@pytest.mark.parametrize('folder', ['.checksums', '.sha256'])
def test_the_server_refuses_to_start_with_originals_or_thumbnails_where_it_keeps_its_records(tmp_path, setting, folder):
    with pytest.raises(ConfigError, match=f'setting {setting} may not be {folder}, where the server keeps its records'):
        load_config({'BASE_DIR': str(tmp_path), setting: folder}, environ={})


def test_the_server_refuses_to_start_without_a_token_window_unless_that_is_acknowledged(tmp_path):
    with pytest.raises(ConfigError, match='tokens would never expire'):
        load_config({'BASE_DIR': str(tmp_path), 'TIME_TOLERANCE': None}, environ={})


def test_a_start_without_a_token_window_that_is_acknowledged_keeps_no_window(tmp_path):
    config = load_config({'BASE_DIR': str(tmp_path)}, environ={'TIME_TOLERANCE': 'none',
                                                                     'NO_TIME_WINDOW_ACKNOWLEDGED': 'true'})
    assert config.TIME_TOLERANCE is None
