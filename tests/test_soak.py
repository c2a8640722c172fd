"""A short soak in CI (the long one: make soak): mixed load at concurrency 32, nothing lost or leaked.

Memory and descriptors are compared like with like: the server idle and settled after the
warm-up third, and idle and settled again after the rest of the soak. In 30 s runs the idle
resident memory still grows by about 8-10 MB after the warm-up (the allocator's arenas filling
up; the 300 s soak levels off at +2 MB), so growth is allowed up to 32 MB: a leak of 100 kB per
/testkey request adds about 50 MB in the same time.
"""

import os

import pytest

from bench import soak

pytestmark = [pytest.mark.disk_only, pytest.mark.serial]


@pytest.fixture(scope='module')
def figures(tmp_path_factory):
    """One short soak, shared by the checks below."""
    figures = soak.run(int(os.environ.get('SOAK_SECONDS', '30')), 32, tmp_path_factory.mktemp('soak'))
    print('\n' + soak.as_table(figures))
    return figures


def test_a_short_soak_answers_every_request_as_the_protocol_says(figures):
    assert figures['requests'] > 500
    assert figures['errors'] == 0, figures['exceptions']


def test_the_server_settles_after_the_warm_up_and_after_the_soak(figures):
    assert figures['settled'], figures['seconds to settle']


def test_a_short_soak_leaks_no_file_descriptors(figures):
    assert figures['fds idle at end'] <= figures['fds idle after warm-up'] + 5


def test_a_short_soak_keeps_idle_memory_flat(figures):
    assert figures['rss idle at end'] - figures['rss idle after warm-up'] < 32 * 2**20


def test_a_short_soak_leaves_no_temporary_files(figures):
    assert figures['leftover temporaries'] == []
