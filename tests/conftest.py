"""The tests' fixtures: an app per test on a fresh attachments folder, on disk and on S3 (SeaweedFS), and the
images most tests use. The harness they build on (clients, servers, nginx, images, processes) is the package
harness/, shared with bench/."""

import json
import os
import secrets
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import front  # noqa: E402
import iiif  # noqa: E402
from config import load_config  # noqa: E402
from harness.client import KEY, Client  # noqa: E402
from harness.images import make_image  # noqa: E402
from harness.seaweed import SeaweedFS  # noqa: E402


@pytest.fixture(autouse=True)
def nothing_remembered_from_another_test():
    """Every test computes what it checks: the memo caches (IIIF plans and tile grids, trusted addresses) start
    empty, so no answer is one remembered from another test run in the same process (as mutation testing runs
    each mutant's tests in a process forked from one that ran them all unmutated)."""
    iiif.remembered_plan.cache_clear()
    iiif.tile_grid.cache_clear()
    front.is_trusted.cache_clear()


def pytest_collection_modifyitems(items):
    """Under mutation testing (mutmut names the mutant in MUTANT_UNDER_TEST), the quickest tests first, by the
    durations mutmut recorded: a mutant is known killed at its first failing test (it runs them with -x), and
    mutmut hands them over in no particular order."""
    if os.environ.get('MUTANT_UNDER_TEST', 'stats') in ('', 'stats', 'fail', 'mutant_generation') \
            or not os.path.exists('mutmut-stats.json'):
        return
    with open('mutmut-stats.json', encoding='utf-8') as stats:
        durations = json.load(stats)['duration_by_test']
    items.sort(key=lambda item: durations.get(item.nodeid, 0))


def pytest_generate_tests(metafunc):
    """Run every test that uses a client on both storages, unless it is marked disk_only or s3_only."""
    if 'storage' in metafunc.fixturenames:
        marked = {name for name in ('disk', 's3') if metafunc.definition.get_closest_marker(f'{name}_only')}
        metafunc.parametrize('storage', sorted(marked) or ['disk', 's3'], indirect=True)


@pytest.fixture(scope='session')
def seaweed(tmp_path_factory):
    """One SeaweedFS S3 server for the session; each test gets its own key prefix."""
    store = SeaweedFS(tmp_path_factory.mktemp('seaweed'))
    yield store
    store.stop()


@pytest.fixture
def storage(request):
    """Settings for the storage under test: disk, or S3 on SeaweedFS with a fresh prefix."""
    if request.param == 'disk':
        return {'STORAGE': 'disk'}
    return request.getfixturevalue('seaweed').settings(prefix='test-' + secrets.token_hex(6))


@pytest.fixture
def make_client(tmp_path, storage):
    """Build a client for settings overriding the defaults; the attachments live in tmp_path."""
    def build(**overrides):
        settings = {'BASE_DIR': str(tmp_path / 'attachments'), 'KEY': KEY, 'ACCESS_LOG': False,
                    'PREGENERATE_SCALE': None, 'SERVER_NAME': 'assets.example.org', 'SERVER_PORT': 8080,
                    **storage}
        settings.update(overrides)
        return Client(load_config(settings, environ={}))
    return build


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope='session')
def jpeg(tmp_path_factory):
    """A 300x200 JPEG photo."""
    return make_image(tmp_path_factory.mktemp('img'), 'plasma:', '300x200', 'jpg')


@pytest.fixture(scope='session')
def png(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp('img'), 'gradient:red-blue', '80x60', 'png')


def pytest_terminal_summary(terminalreporter, config):
    """Say which random order ran (pytest -q hides pytest-randomly's header), so a failure can be replayed."""
    seed = getattr(config.option, 'randomly_seed', None)
    if isinstance(seed, int):
        terminalreporter.write_line(f'random order: replay it with --randomly-seed={seed}')
