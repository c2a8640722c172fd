"""A short soak in CI (the long one: make soak): mixed load at concurrency 32, nothing lost or leaked."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))

import soak  # noqa: E402

pytestmark = pytest.mark.disk_only


def test_a_short_soak_has_no_errors_flat_memory_and_no_leaks(tmp_path):
    figures = soak.run(int(os.environ.get('SOAK_SECONDS', '30')), 32, tmp_path)
    print('\n' + soak.as_table(figures))
    assert figures['requests'] > 500
    assert figures['errors'] == 0, figures['exceptions']
    assert figures['rss at end'] < 1.10 * figures['rss after warm-up']
    assert figures['fds at end'] <= figures['fds after warm-up'] + 5
    assert figures['leftover temporaries'] == []
