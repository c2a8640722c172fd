"""nginx in front of a running server, on loopback, with its own certificate: as an institution deploys it."""

import os
import http.client
import socket
import ssl
import subprocess

from harness.processes import PROJECT, free_port, holds_listener, started, stop_process
from harness.servers import exchange


def start_nginx(folder, name, http_block, events=''):
    """nginx run from `folder` with `http_block` inside http {} (and `events` inside events {}); stopped by the
    caller through the process."""
    user = 'user root;' if os.geteuid() == 0 else ''
    temporary = ' '.join(f'{kind}_temp_path {folder}/{name}-{kind};'
                         for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
    (folder / f'{name}.conf').write_text(
        f'{user} pid {folder}/{name}.pid; error_log {folder}/{name}-error.log; worker_processes 2;\n'
        f'events {{ {events} }}\n'
        f'http {{ include /etc/nginx/mime.types; access_log off; {temporary}\n{http_block}\n}}\n')
    return subprocess.Popen(['nginx', '-p', str(folder), '-c', str(folder / f'{name}.conf'), '-g', 'daemon off;'],
                            stderr=subprocess.DEVNULL)


class LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that names `host` in the handshake (SNI), the Host header and the certificate check."""

    def connect(self):
        self.sock = self._context.wrap_socket(socket.create_connection(('127.0.0.1', self.port), self.timeout),
                                              server_hostname=self.host)


class Nginx:
    """nginx on loopback with deploy/nginx.conf, its ports, certificate, name and folder swapped for the test's.

    `changes` maps more exact strings of the file to what the test runs instead (e.g. shorter timeouts)."""

    name = 'localhost'

    def __init__(self, folder, upstream_port, attachments, changes=None):
        self.folder = folder
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj',
                        f'/CN={self.name}', '-addext', f'subjectAltName=DNS:{self.name}', '-keyout',
                        str(folder / 'key.pem'), '-out', str(folder / 'cert.pem')],
                       check=True, capture_output=True, timeout=60)
        with open(os.path.join(PROJECT, 'deploy', 'nginx.conf')) as example:
            template = example.read()
        for old, new in (changes or {}).items():
            assert old in template, f'deploy/nginx.conf no longer says {old!r}'
            template = template.replace(old, new)
        error_log = folder / 'proxy-error.log'

        def launch():
            self.https, self.http = free_port(), free_port()
            site = (template
                    .replace('server 127.0.0.1:8080;', f'server 127.0.0.1:{upstream_port};')
                    .replace('listen 443 ssl', f'listen 127.0.0.1:{self.https} ssl')
                    .replace('listen 80', f'listen 127.0.0.1:{self.http}')
                    .replace('server_name assets.museum.org;', f'server_name {self.name};')
                    .replace('/etc/ssl/certs/assets.museum.org.pem', str(folder / 'cert.pem'))
                    .replace('/etc/ssl/private/assets.museum.org.key', str(folder / 'key.pem'))
                    .replace('alias /home/specify/attachments/;', f'alias {attachments}/;'))
            error_log.unlink(missing_ok=True)
            self.process = start_nginx(folder, 'proxy', site)
            return self.process, lambda: error_log.read_text() if error_log.exists() else ''
        try:
            started(launch, self._answers, 20)
        except RuntimeError as failure:
            raise RuntimeError(f'nginx did not start: {failure}') from None

    def _answers(self, process):
        """True once our own nginx listens on both ports and answers GET / over HTTPS."""
        if not (holds_listener(process.pid, self.https) and holds_listener(process.pid, self.http)):
            return False
        try:
            return self.request('GET', '/')[0] == 200
        except OSError:
            return False

    def context(self):
        """A TLS client context that trusts this nginx's certificate."""
        return ssl.create_default_context(cafile=str(self.folder / 'cert.pem'))

    def connection(self, timeout=120):
        return LoopbackHTTPS(self.name, self.https, context=self.context(), timeout=timeout)

    def request(self, method, path, body=None, headers=None):
        return exchange(self.connection(), method, path, body, headers)

    def stop(self):
        stop_process(self.process, patience=10)
