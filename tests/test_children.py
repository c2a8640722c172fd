"""The engines' child processes (engines/children.py, engines/framing.py): what a child may send, what its start
and a slow server cost the job, and that a child that breaks the framing is ended, never kept or leaked."""

import sys
import time

import pytest

from engines.children import ChildFailed, ChildPool, ChildTimedOut
from harness.images import make_image, with_exif


def pool_running(program, longest_data=0):
    """A pool whose children run `program`, a Python text given the framing's ChildChannel as `channel`."""
    prelude = 'from engines.framing import ChildChannel; channel = ChildChannel(); '
    return ChildPool([sys.executable, '-c', prelude + program], 1, longest_data=longest_data)


def test_a_child_that_answers_its_job_is_kept_for_the_next():
    pool = pool_running("channel.send({'ready': True})\nwhile True:\n"
                        "    job, _ = channel.receive()\n    channel.send({'ok': True, 'printed': job['args'][0]})")
    first = pool.run('echo', ['one'], None, time.monotonic() + 30)
    [kept] = pool.idle
    second = pool.run('echo', ['two'], None, time.monotonic() + 30)
    assert (first[0]['printed'], second[0]['printed'], pool.idle) == ('one', 'two', [kept])


def test_a_line_nested_too_deep_for_json_ends_the_child_as_a_broken_framing():
    pool = pool_running("channel.send({'ready': True}); channel.receive(); "
                        "channel.writer.write(b'[' * 100000 + b'\\n'); channel.writer.flush(); import time; time.sleep(60)")
    started = []
    real_child = pool._child
    pool._child = lambda: started.append(real_child()) or started[-1]
    with pytest.raises(ChildFailed):
        pool.run('job', [], None, time.monotonic() + 30)
    assert started[0].poll() is not None and pool.idle == []


def test_a_child_announcing_more_bytes_than_it_may_send_is_ended():
    pool = pool_running("channel.send({'ready': True}); channel.receive(); channel.send({'ok': True}, b'x' * 100)",
                        longest_data=10)
    with pytest.raises(ChildFailed):
        pool.run('job', [], None, time.monotonic() + 30)
    assert pool.idle == []


def test_a_child_that_overruns_its_deadline_is_killed():
    pool = pool_running("channel.send({'ready': True}); channel.receive(); import time; time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(ChildTimedOut):
        pool.run('job', [], None, time.monotonic() + 1)
    assert time.monotonic() - started < 10 and pool.idle == []


def test_a_childs_start_does_not_count_against_its_jobs_deadline():
    pool = pool_running("import time; time.sleep(2); channel.send({'ready': True}); channel.receive(); "
                        "channel.send({'ok': True})")
    assert pool.run('job', [], None, time.monotonic() + 1)[0] == {'ok': True}


def test_the_servers_own_time_serving_a_child_does_not_count_against_the_deadline():
    pool = pool_running("channel.send({'ready': True}); channel.receive(); channel.send({'read': [0, 1]}); "
                        "_, data = channel.receive(); channel.send({'ok': True}, data)", longest_data=1)

    def slow_store(message, _data):
        time.sleep(2)
        return {}, b'z'
    assert pool.run('job', [], None, time.monotonic() + 1, serve=slow_store)[1] == b'z'


def test_what_serving_a_child_raises_is_raised_as_it_is_and_ends_the_child():
    pool = pool_running("channel.send({'ready': True}); channel.receive(); channel.send({'read': [0, 1]}); "
                        "channel.receive()")

    def store_gone(message, _data):
        raise TimeoutError('the store did not answer')
    with pytest.raises(TimeoutError, match='the store did not answer'):
        pool.run('job', [], None, time.monotonic() + 30, serve=store_gone)
    assert pool.idle == []


@pytest.mark.disk_only
def test_a_metadata_reader_slow_to_start_still_reads_a_file_within_metadata_timeout(make_client, tmp_path):
    client = make_client(METADATA_TIMEOUT=2)
    client.upload('a.jpg', with_exif(make_image(tmp_path, 'plasma:', '300x200', 'jpg'), date='2020:01:02 03:04:05'))
    pool = client.app.metadata.children
    pool.command = [sys.executable, '-c', 'import time, runpy, sys; time.sleep(2.5); sys.argv = ["exif_child", *sys.argv[1:]]; '
                    'runpy.run_module("engines.exif_child", run_name="__main__")', *pool.command[3:]]
    answer = client.get('/getmetadata', {'filename': 'a.jpg', 'coll': 'Fish', 'dt': 'date', 'token': client.token('a.jpg')})
    assert answer.text == '2020:01:02 03:04:05'
