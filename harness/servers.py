"""`python server.py` as a process under Paste on a free loopback port, and one HTTP exchange with it."""

import contextlib
import os
import http.client
import subprocess
import sys

from harness.client import KEY
from harness.processes import PROJECT, SERVER_SCRIPT, free_port, holds_listener, started, stop_process, wait_for


class RunningServer:
    """`python server.py` under Paste on a free loopback port, settings from the environment, run from `cwd`."""

    def __init__(self, base_dir, log_path, preexec_fn=None, cwd=None, **env):
        self.base_dir = base_dir

        self.log = open(log_path, 'w+b')

        def launch():
            self.log.seek(0)
            self.log.truncate()
            self.port = free_port()
            environment = dict(os.environ, HOST='127.0.0.1', PORT=str(self.port), BASE_DIR=str(base_dir),
                               SERVER_NAME='127.0.0.1', SERVER_PORT=str(self.port), KEY=KEY)
            environment.update(env)
            environment = {name: value for name, value in environment.items() if value is not None}
            self.process = subprocess.Popen([sys.executable, SERVER_SCRIPT], cwd=cwd or PROJECT, env=environment,
                                            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
            return self.process, self.output
        try:
            started(launch, self._answers, 30)
        except RuntimeError as failure:
            self.log.close()
            raise RuntimeError(f'server did not start: {failure}') from None
        wait_for(lambda: self.client_connections() == 0, 10)     # the check's own connection counted out, so a
                                                                # test's connections meet the caps alone

    def client_connections(self):
        """Connections to the server's port that its process still holds (its listening socket left out)."""
        with open('/proc/net/tcp') as rows:
            inodes = {f'socket:[{fields[9]}]' for fields in map(str.split, rows)
                      if fields[1].endswith(f':{self.port:04X}') and fields[3] != '0A'}
        held = 0
        for fd in os.listdir(f'/proc/{self.process.pid}/fd'):
            with contextlib.suppress(FileNotFoundError):           # closed while we looked
                held += os.readlink(f'/proc/{self.process.pid}/fd/{fd}') in inodes
        return held

    def _answers(self, process):
        """True once our own process listens on the port and answers GET / there."""
        if not holds_listener(process.pid, self.port):
            return False
        try:
            return self.request('GET', '/')[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, headers=None, timeout=60, source='127.0.0.1'):
        """(status, headers, body) of one HTTP request from the loopback address `source`."""
        return exchange(http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout, source_address=(source, 0)),
                        method, path, body, headers)

    def output(self):
        self.log.seek(0)
        return self.log.read().decode('utf-8', 'replace')

    def stop(self):
        stop_process(self.process, patience=10)
        self.log.close()


def exchange(connection, method, path, body=None, headers=None):
    """(status, headers, body) of one request on a fresh connection, closed afterwards."""
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()
