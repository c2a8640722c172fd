"""Processes the tests and benchmarks start: free loopback ports, waiting for a listener, the process tree, and
stopping what they started by its process id."""

import os
import random
import socket
import subprocess
import time




PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER_SCRIPT = os.path.join(PROJECT, 'server.py')


def wait_for(predicate, seconds=10):
    """True as soon as predicate() is; False if it still is not after `seconds` (a deadline, never a guess)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def free_port():
    """A loopback port free now: another process may take it before ours binds, so callers retry (see `started`)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def free_ports(count):
    """Free loopback ports whose +10000 (SeaweedFS's gRPC port) is free too, both below the ephemeral ports
    (32768 on): a readiness probe of a port nobody listens on yet could otherwise connect to itself."""
    ports, draw = [], random.SystemRandom()      # not the seeded `random`: pytest-randomly makes it repeat
    while len(ports) < count:
        port = draw.randint(20000, 22700)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(('127.0.0.1', candidate))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


def holds_listener(pid, port):
    """True when process `pid` itself holds a socket listening on `port`, so what answers there is ours (Linux)."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as rows:
            inodes.update(f'socket:[{fields[9]}]' for fields in map(str.split, rows)
                          if fields[1].endswith(f':{port:04X}') and fields[3] == '0A')
    try:
        return any(os.readlink(f'/proc/{pid}/fd/{fd}') in inodes for fd in os.listdir(f'/proc/{pid}/fd'))
    except OSError:          # the process ended, or closed a descriptor while we looked
        return False


PORT_TAKEN = 'address already in use'


def started(launch, ready, seconds, attempts=5):
    """launch() a process on fresh ports until ready(process) (it answers, from its own socket) or it fails.

    A process that died saying PORT_TAKEN lost its port to another between probe and bind: try new ports.
    Returns the process; raises RuntimeError with the last attempt's output otherwise.
    """
    for _ in range(attempts):
        process, output = launch()
        if wait_for(lambda: process.poll() is not None or ready(process), seconds) and process.poll() is None:
            return process
        stop_process(process, patience=10)
        if PORT_TAKEN not in output().lower():
            break
    raise RuntimeError(output())


def parent_pids():
    """{pid: parent pid} of every process now running, from /proc (read as bytes: a name need not be UTF-8)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat', 'rb') as stat:
                parents[int(entry)] = int(stat.read().rsplit(b')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):       # it ended meanwhile
            pass
    return parents


def descendants(pid, parents=None):
    """Every process descending from `pid` (children, their children, ...)."""
    parents = parent_pids() if parents is None else parents
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, of in parents.items() if of == parent]
        found += kids
        frontier += kids
    return found


def stop_process(process, patience):
    """SIGTERM a process the tests started, then SIGKILL it if it has not ended after `patience` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(patience)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
