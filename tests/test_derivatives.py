"""The administration command derivatives.py: generate the configured scales of stored originals, prune
the rest; on disk and on S3 (SeaweedFS) alike."""

import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import derivatives
from checksums import Hashing
from harness.client import KEY
from harness.images import image_info, make_image
from harness.processes import PROJECT, wait_for
from config import load_config
from engines.imagemagick import ImageMagick
from names import TEMP_PREFIX, thumbnail_source
from storages import make_storage

SCALES = '400,64'


class Store:
    """A fresh attachments store (disk or S3) with the server's settings as the command reads them."""

    def __init__(self, tmp_path, storage, **settings):
        self.tmp_path = tmp_path
        self.environ = {'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY, 'PREGENERATE_SCALE': SCALES,
                        **{name: str(value) for name, value in storage.items()}, **settings}
        self.storage = make_storage(load_config(environ=self.environ))
        self.s3 = self.environ.get('STORAGE') == 's3'

    def put_original(self, name, data, coll=None):
        """Store an original as an upload does (which also drops its thumbnails)."""
        staged = self.tmp_path / f'staged-{name}'
        staged.write_bytes(data)
        os.makedirs(self.environ['BASE_DIR'], exist_ok=True)
        hashing = Hashing()
        hashing.update(data)
        self.storage.save(coll, name, str(staged), hashing.checksum())

    def put_thumbnail(self, cache_name, data, coll=None):
        """Put a file in the thumbnails folder directly, as an older server or another tool left it."""
        self._put([*self.storage.folder_parts(coll), self.storage.thumb_dir, cache_name], data)

    def replace_behind_the_servers_back(self, name, data):
        """Rewrite an original without the server (so its thumbnails stay), newer than any thumbnail."""
        parts = self.storage.original_parts(None, name)
        if self.s3:      # LastModified counts whole seconds: the new version must fall in a later one
            newest = max(modified for _, _, modified in self.storage.derivatives(None))
            assert wait_for(lambda: time.time() >= int(newest) + 1.1, 5)
        else:           # its thumbnails made ten seconds before (a file system's clock may be coarse)
            for cache_name, _size, modified in self.storage.derivatives(None):
                if thumbnail_source(cache_name) == name:
                    path = self.storage.path([self.storage.thumb_dir, cache_name])
                    os.utime(path, (modified - 10, modified - 10))
        self._put(parts, data)

    def _put(self, parts, data):
        if self.s3:
            self.storage.client.put_object(Bucket=self.storage.bucket, Key=self.storage.key(parts), Body=data)
        else:
            os.makedirs(os.path.dirname(self.storage.path(parts)), exist_ok=True)
            with open(self.storage.path(parts), 'wb') as f:
                f.write(data)

    def files(self):
        """{path relative to the store's root: bytes} of every stored file (not the key file, not staging)."""
        found = {}
        if self.s3:
            start = self.storage.prefix + '/'
            for page in self.storage.client.get_paginator('list_objects_v2').paginate(
                    Bucket=self.storage.bucket, Prefix=start):
                for item in page.get('Contents', []):
                    found[item['Key'][len(start):]] = self.storage.client.get_object(
                        Bucket=self.storage.bucket, Key=item['Key'])['Body'].read()
            return found
        base = self.environ['BASE_DIR']
        for folder, _dirs, names in os.walk(base):
            for name in names:
                with open(os.path.join(folder, name), 'rb') as f:
                    found[os.path.relpath(os.path.join(folder, name), base)] = f.read()
        found.pop('.web-asset-server.key', None)
        return found

    def thumbnail_times(self, coll=None):
        return {name: modified for name, _size, modified in self.storage.derivatives(coll)}

    def run(self, *args, **settings):
        """derivatives.main in this process (not reniced), with the store's settings; its exit status."""
        return derivatives.main([*args, '--nice', '0'], environ={**self.environ, **settings})

    def command(self, *args):
        """derivatives.py as its own process, in a session of its own (so it and its conversions can be killed)."""
        return subprocess.Popen([sys.executable, 'derivatives.py', *args], cwd=PROJECT, env={**os.environ, **self.environ},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def store(tmp_path, storage):
    return Store(tmp_path, storage)


@pytest.fixture(scope='session')
def photo(tmp_path_factory):
    """An 800x600 JPEG."""
    return make_image(tmp_path_factory.mktemp('img'), 'gradient:wheat-darkgreen', '800x600', 'jpg')


@pytest.fixture
def conversions(monkeypatch):
    """(scale, width of the image converted) of every conversion made in this process, in order."""
    made = []
    convert = ImageMagick._convert

    def counted(self, kind, scale, size, scratch, *rest):
        convert(self, kind, scale, size, scratch, *rest)
        made.append((scale, size.width))
    monkeypatch.setattr(ImageMagick, '_convert', counted)
    return made


# --- generate -----------------------------------------------------------------------------------

def test_generate_makes_every_configured_scale_largest_first_each_from_the_larger(store, photo, conversions, tmp_path):
    for name in ('a.jpg', 'b.jpg'):
        store.put_original(name, photo)
    assert store.run('generate', '--jobs', '1') == 0
    assert conversions == [(400, 800), (64, 400)] * 2         # the 64 px from the 400 px, not the 800 px original
    files = store.files()
    assert {name for name in files if name.startswith('thumbnails/')} == {
        'thumbnails/a_400.jpg', 'thumbnails/a_64.jpg', 'thumbnails/b_400.jpg', 'thumbnails/b_64.jpg'}
    assert image_info(files['thumbnails/a_400.jpg'], tmp_path) == ('JPEG', 400, 300)
    assert image_info(files['thumbnails/a_64.jpg'], tmp_path) == ('JPEG', 64, 48)


def test_a_rerun_converts_nothing_and_checks_no_file_one_by_one_when_every_scale_is_fresh(
        store, photo, conversions, monkeypatch, capsys):
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        store.put_original(name, photo)
    store.run('generate')
    conversions.clear()
    checked = []
    monkeypatch.setattr(type(store.storage), 'derivative_is_fresh', lambda *args: checked.append(args))
    assert store.run('generate') == 0
    assert (conversions, checked) == ([], [])
    assert '3 originals: 3 already fresh, 0 done, 0 failed; made 0 thumbnails' in capsys.readouterr().out


def test_a_rerun_remakes_the_thumbnails_of_an_original_replaced_behind_the_servers_back(
        store, photo, conversions, tmp_path):
    for name in ('a.jpg', 'b.jpg'):
        store.put_original(name, photo)
    store.run('generate')
    store.replace_behind_the_servers_back('b.jpg', make_image(tmp_path, 'gradient:red-blue', '600x800', 'jpg'))
    conversions.clear()
    store.run('generate')
    assert conversions == [(400, 600), (64, 300)]
    assert image_info(store.files()['thumbnails/b_400.jpg'], tmp_path)[1:] == (300, 400)


def test_a_run_killed_with_sigkill_is_finished_by_a_rerun_that_converts_none_twice(store, photo, conversions):
    names = [f'sheet{n}.jpg' for n in range(8)]
    for name in names:
        store.put_original(name, photo)
    command = store.command('generate', '--jobs', '1', '--pause', '1', '--nice', '0')
    try:        # killed when an original has its 400 px but not yet its 64 px (the pause after each conversion)
        assert wait_for(lambda: len(store.thumbnail_times()) in (3, 5, 7, 9, 11, 13), 120), command.stderr.read()
        os.killpg(command.pid, signal.SIGKILL)
    finally:
        command.wait(30)
    assert command.returncode == -signal.SIGKILL
    before = store.thumbnail_times()
    assert len(before) % 2 == 1 and len(before) < 2 * len(names)
    assert store.run('generate') == 0
    assert len(conversions) == 2 * len(names) - len(before)
    after = store.thumbnail_times()
    assert set(after) == {f'sheet{n}_{scale}.jpg' for n in range(8) for scale in (400, 64)}
    assert {name: after[name] for name in before} == before          # none made again


@pytest.mark.disk_only
def test_generate_removes_the_scratch_folders_a_killed_run_left_once_they_are_an_hour_old(store, photo):
    store.put_original('a.jpg', photo)
    thumbnails = os.path.join(store.environ['BASE_DIR'], 'thumbnails')
    old, recent = (os.path.join(thumbnails, TEMP_PREFIX + tag) for tag in ('0123456789abcdef', 'fedcba9876543210'))
    for scratch, age in ((old, 7200), (recent, 60)):
        os.makedirs(scratch)
        open(os.path.join(scratch, 'out'), 'wb').close()
        os.utime(scratch, (time.time() - age, time.time() - age))
    assert store.run('generate') == 0
    assert (os.path.exists(old), os.path.exists(recent)) == (False, True)


def test_a_broken_file_and_one_of_a_kind_without_thumbnails_are_named_and_passed_over(
        store, photo, conversions, capsys):
    store.put_original('good.jpg', photo)
    store.put_original('bro\x1bken.jpg', b'\xff\xd8\xff\xe0' + bytes(range(256)) * 8)
    store.put_original('notes.txt', b'field notes\n')
    assert store.run('generate') == 0
    output = capsys.readouterr()
    assert 'failed: bro\\x1bken.jpg: This file could not be thumbnailed.' in output.err
    assert 'failed: notes.txt: No thumbnail can be made from this kind of file.' in output.err
    assert '\x1b' not in output.err.replace('\x1b[K', '')
    assert '3 originals: 0 already fresh, 1 done, 2 failed; made 2 thumbnails' in output.out
    assert set(store.thumbnail_times()) == {'good_400.jpg', 'good_64.jpg'}


def test_an_original_gone_before_its_turn_is_named_and_passed_over(store, photo, monkeypatch, capsys):
    store.put_original('here.jpg', photo)
    listed = type(store.storage).originals_modified
    monkeypatch.setattr(type(store.storage), 'originals_modified',
                        lambda self, coll: itertools.chain(listed(self, coll), [('gone.jpg', 0.0)]))
    assert store.run('generate') == 0
    assert 'failed: gone.jpg: No such file.' in capsys.readouterr().err
    assert set(store.thumbnail_times()) == {'here_400.jpg', 'here_64.jpg'}


def test_generate_with_a_collection_makes_only_that_collections_thumbnails(tmp_path, storage, photo):
    store = Store(tmp_path, storage, COLLECTION_DIRS='{"Fish": "fish", "Plants": "plants"}')
    store.put_original('a.jpg', photo, coll='Fish')
    store.put_original('b.jpg', photo, coll='Plants')
    assert store.run('generate', '--collection', 'Fish') == 0
    assert (set(store.thumbnail_times('Fish')), set(store.thumbnail_times('Plants'))) == (
        {'a_400.jpg', 'a_64.jpg'}, set())


def test_generate_without_a_collection_makes_every_collections_thumbnails(tmp_path, storage, photo):
    store = Store(tmp_path, storage, COLLECTION_DIRS='{"Fish": "fish", "Plants": "plants"}')
    store.put_original('a.jpg', photo, coll='Fish')
    store.put_original('b.jpg', photo, coll='Plants')
    assert store.run('generate') == 0
    assert (set(store.thumbnail_times('Fish')), set(store.thumbnail_times('Plants'))) == (
        {'a_400.jpg', 'a_64.jpg'}, {'b_400.jpg', 'b_64.jpg'})


def test_generate_dry_run_converts_nothing_and_says_how_many_it_would_make(store, photo, capsys):
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        store.put_original(name, photo)
    store.put_thumbnail('c_400.jpg', b'made before')
    files = store.files()
    assert store.run('generate', '--dry-run') == 0
    assert 'would make 5 thumbnails of 3 originals; 0 of 3 originals already fresh' in capsys.readouterr().out
    assert store.files() == files


def test_progress_on_a_pipe_is_a_plain_line_not_one_per_file(store, photo, capsys):
    for name in ('a.jpg', 'b.jpg', 'c.jpg'):
        store.put_original(name, photo)
    store.run('generate')
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if 'originals, ' in line and ' ETA ' in line]
    assert len(progress) == 1 and progress[0].startswith('[' + '#' * 30 + '] 3/3 originals, ')
    assert '\r' not in ''.join(lines)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.disk_only
def test_progress_on_a_terminal_is_redrawn_in_place(store, photo, monkeypatch):
    for name in ('a.jpg', 'b.jpg'):
        store.put_original(name, photo)
    monkeypatch.setattr(sys, 'stderr', Terminal())
    store.run('generate')
    shown = sys.stderr.getvalue()
    assert '\r[' + '#' * 30 + '] 2/2 originals, ' in shown and shown.endswith('\n')


@pytest.mark.disk_only
def test_generate_runs_at_the_priority_nice_asks(store, photo):
    store.put_original('a.jpg', photo)
    command = store.command('generate', '--nice', '7', '--pause', '60')
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    try:
        assert wait_for(lambda: os.getpriority(os.PRIO_PROCESS, command.pid) == expected, 30)
    finally:
        os.killpg(command.pid, signal.SIGKILL)
        command.wait(30)


def test_a_storage_that_cannot_be_reached_ends_the_run_with_status_1(tmp_path):
    with socket.socket() as bound:          # bound, never listening: connections to it are refused
        bound.bind(('127.0.0.1', 0))
        store = Store(tmp_path, {'STORAGE': 's3', 'S3_BUCKET': 'attachments', 'S3_ADDRESSING_STYLE': 'path',
                                 'S3_ENDPOINT_URL': f'http://127.0.0.1:{bound.getsockname()[1]}',
                                 'S3_REGION': 'us-east-1', 'S3_ACCESS_KEY_ID': 'any', 'S3_SECRET_ACCESS_KEY': 'any',
                                 'S3_CONNECT_TIMEOUT': 1})
        command = store.command('generate', '--nice', '0')
        _out, err = command.communicate(timeout=120)
    assert command.returncode == 1
    assert 'derivatives: the storage is unreachable; run it again' in err


# --- prune --------------------------------------------------------------------------------------

@pytest.fixture
def cluttered(store, photo):
    """A store with configured thumbnails of a.jpg, one of a scale not configured (1000 bytes), an orphan
    (2345 bytes), and files in the thumbnails folder that are not thumbnails."""
    store.put_original('a.jpg', photo)
    for cache_name, size in [('a_400.jpg', 10), ('a_64.jpg', 20), ('a_200.jpg', 1000), ('gone_400.jpg', 2345),
                             ('notes.txt', 30), ('a_0400.jpg', 40), ('.~wast-0123abcd_200.jpg', 50)]:
        store.put_thumbnail(cache_name, b'x' * size)
    return store


def test_prune_removes_scales_not_configured_and_orphans_and_reports_files_and_bytes(cluttered, capsys):
    assert cluttered.run('prune') == 0
    assert 'removed 2 thumbnails, 3345 bytes (0.0 MB): 1 of scales not configured, 1 orphans' in \
        capsys.readouterr().out
    assert not {'thumbnails/a_200.jpg', 'thumbnails/gone_400.jpg'} & set(cluttered.files())


def test_prune_keeps_originals_configured_scales_other_files_and_temporaries(cluttered):
    assert cluttered.run('prune') == 0
    assert set(cluttered.files()) >= {'originals/a.jpg', 'thumbnails/a_400.jpg', 'thumbnails/a_64.jpg',
                                      'thumbnails/notes.txt', 'thumbnails/a_0400.jpg',
                                      'thumbnails/.~wast-0123abcd_200.jpg'}


def test_prune_dry_run_removes_nothing_and_says_what_it_would_free(cluttered, capsys):
    files = cluttered.files()
    assert cluttered.run('prune', '--dry-run') == 0
    assert 'would remove 2 thumbnails, 3345 bytes' in capsys.readouterr().out
    assert cluttered.files() == files


def test_prune_keeps_the_webp_of_a_configured_scale_and_removes_the_webp_of_another(store, photo, capsys):
    store.put_original('a.jpg', photo)
    store.put_thumbnail('a_400_webp.jpg', b'w' * 10)
    store.put_thumbnail('a_200_webp.jpg', b'w' * 20)
    assert store.run('prune') == 0
    assert 'removed 1 thumbnails, 20 bytes' in capsys.readouterr().out
    assert {'thumbnails/a_400_webp.jpg'} & set(store.files()) == {'thumbnails/a_400_webp.jpg'}


def test_a_webp_of_a_configured_scale_does_not_count_as_that_scale_made(store, photo, conversions):
    store.put_original('a.jpg', photo)
    store.put_thumbnail('a_400_webp.jpg', b'w' * 10)
    store.put_thumbnail('a_64_webp.jpg', b'w' * 10)
    assert store.run('generate') == 0
    assert [scale for scale, _width in conversions] == [400, 64]


def test_prune_keeps_the_iiif_pyramid_and_tiles_of_a_stored_original_and_removes_orphaned_ones(store, photo, capsys):
    store.put_original('a.jpg', photo)
    for cache_name in ('a_iiif.jpg', 'a_iiif,0,0,512,512,512,512.jpg', 'gone_iiif.jpg', 'gone_iiif,0,0,1,1,1,1.jpg'):
        store.put_thumbnail(cache_name, b'p' * 10)
    assert store.run('prune') == 0
    assert 'removed 2 thumbnails, 20 bytes (0.0 MB): 0 of scales not configured, 2 orphans' in capsys.readouterr().out
    assert {name for name in store.files() if '_iiif' in name} == {'thumbnails/a_iiif.jpg',
                                                                   'thumbnails/a_iiif,0,0,512,512,512,512.jpg'}


def test_prune_brings_the_cache_under_the_default_bound_of_the_originals_bytes_iiif_first(store, photo, capsys):
    store.put_original('a.jpg', photo)
    store.put_thumbnail('a_400.jpg', b't' * 10)
    tile = len(photo) // 2
    for x in range(6):                              # three times the original's bytes of IIIF answers
        store.put_thumbnail(f'a_iiif,{x * 512},0,512,512,512,512.jpg', b'p' * tile)
    assert store.run('prune') == 0
    cached = sum(len(data) for name, data in store.files().items() if name.startswith('thumbnails/'))
    assert cached <= len(photo) * 9 // 10 and 'thumbnails/a_400.jpg' in store.files()
    assert f'over THUMBNAIL_CACHE_MAX_BYTES ({len(photo)} bytes) removed 5 more, {5 * tile} bytes' in \
        capsys.readouterr().out


def test_prune_dry_run_says_what_the_bound_would_remove_and_removes_nothing(store, photo, capsys):
    store.put_original('a.jpg', photo)
    store.put_thumbnail('a_iiif.jpg', b'p' * (2 * len(photo)))
    files = store.files()
    assert store.run('prune', '--dry-run') == 0
    assert 'would remove 1 more' in capsys.readouterr().out and store.files() == files


def test_generate_makes_thumbnails_beside_iiif_derivatives_without_taking_them_for_scales(store, photo, conversions):
    store.put_original('a.jpg', photo)
    store.put_thumbnail('a_iiif.jpg', b'p' * 10)
    assert store.run('generate') == 0
    assert [scale for scale, _width in conversions] == [400, 64]
