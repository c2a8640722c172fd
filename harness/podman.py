"""The Dockerfile built and run with no Docker engine and no registry: the FROM image made by debootstrap,
`podman build` and `buildah run` with chroot isolation (host networking, so the server is on 127.0.0.1)."""

import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from harness.processes import PROJECT, descendants, wait_for
from harness.servers import exchange

TAG = 'localhost/web-asset-server:test'
MIRROR = 'http://deb.debian.org/debian'
TOOLS = ('podman', 'buildah', 'debootstrap')


class ImageError(AssertionError):
    """A build or container command failed; the message is the tool's own output."""


def missing():
    """Why these tests cannot run on this machine, or None."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return 'needs ' + ', '.join(absent) + ' (tests/packages.txt installs them)'
    if os.geteuid() != 0:
        return 'needs root: rootless podman/buildah need user namespaces and subordinate ids, not set up here'
    return None


def tool(*args, timeout=120, **options):
    """Run a podman/buildah/debootstrap command; its stdout, or ImageError with its stderr."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors='replace', timeout=timeout, **options)
    except subprocess.TimeoutExpired as late:
        raise ImageError(f'{" ".join(args)} took over {timeout} s:\n{late.stderr or ""}') from None
    if done.returncode != 0:
        raise ImageError(f'{" ".join(args)} failed ({done.returncode}):\n{done.stderr[-6000:]}{done.stdout[-3000:]}')
    return done.stdout


def base_name(dockerfile):
    """The image the Dockerfile's FROM line names, fully qualified as podman resolves it."""
    name = re.search(r'^FROM\s+(\S+)', dockerfile, re.M).group(1)
    return name if '/' in name else 'docker.io/library/' + name


def ensure_base(dockerfile, scratch):
    """Make the FROM image (debian:<suite>-slim) unless the store has it; seconds spent."""
    name = base_name(dockerfile)
    if subprocess.run(['podman', 'image', 'exists', name], capture_output=True).returncode == 0:
        return 0.0
    match = re.fullmatch(r'docker\.io/library/debian:(\w+)-slim', name)
    if not match:
        raise ImageError(f'cannot make the base image {name}: only debian:<suite>-slim is made by debootstrap')
    started, root = time.monotonic(), scratch / 'rootfs'
    tool('debootstrap', '--variant=minbase', match.group(1), str(root), MIRROR, timeout=1200)
    slim(root, match.group(1))
    tool('tar', '--numeric-owner', '-C', str(root), '-cf', str(scratch / 'rootfs.tar'), '.', timeout=300)
    shutil.rmtree(root)
    tool('podman', 'import', '--change', 'CMD ["bash"]', str(scratch / 'rootfs.tar'), name, timeout=300)
    os.remove(scratch / 'rootfs.tar')
    return time.monotonic() - started


def slim(root, suite):
    """Shape the debootstrap tree like Debian's -slim images: no docs, man pages or locales, no apt caches."""
    def write(path, text):
        with open(root / path, 'w') as f:
            f.write(text)
    excluded = ('usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/locale', 'usr/share/lintian')
    write('etc/dpkg/dpkg.cfg.d/docker', ''.join(f'path-exclude /{path}/*\n' for path in excluded)
          + 'path-include /usr/share/doc/*/copyright\n')
    for path in excluded:
        for entry in (root / path).glob('*'):
            if not (entry / 'copyright').is_file():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    write('etc/apt/apt.conf.d/docker-clean',
          'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
          'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
    os.remove(root / 'etc/apt/sources.list')
    write('etc/apt/sources.list.d/debian.sources',
          f'Types: deb\nURIs: {MIRROR}\nSuites: {suite} {suite}-updates\nComponents: main\n'
          'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n'
          f'Types: deb\nURIs: {MIRROR}-security\nSuites: {suite}-security\nComponents: main\n'
          'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n')
    for pattern in ('var/lib/apt/lists/*', 'var/cache/apt/*.bin', 'var/cache/apt/archives/*.deb'):
        for entry in root.glob(pattern):
            if entry.is_file():
                entry.unlink()


def pip_settings(folder):
    """A pip configuration for the build only: this machine's CA bundle and (non-file) index, in `folder`."""
    bundle = os.environ.get('PIP_CERT') or '/etc/ssl/certs/ca-certificates.crt'
    shutil.copyfile(bundle, folder / 'ca.crt')
    lines = ['[global]', 'cert = /mnt/ca.crt']
    listed = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], capture_output=True, text=True).stdout
    for name in ('index-url', 'extra-index-url'):
        urls = [url for found in re.findall(rf"^(?:global|:env:)\.{name}='(.*)'$", listed, re.M)
                for url in found.split() if url.startswith(('http://', 'https://'))]
        if urls:
            lines.append(f'{name} = {" ".join(urls)}')
    (folder / 'pip.conf').write_text('\n'.join(lines) + '\n')


def build(scratch, context=PROJECT, tag=TAG):
    """`podman build` of the Dockerfile in `context`, pip given the machine's CA bundle by mounts only; seconds."""
    settings = scratch / 'pip'
    settings.mkdir()
    pip_settings(settings)
    started = time.monotonic()
    tool('podman', 'build', '--pull=never', '--isolation', 'chroot', '--format', 'docker',
         '-v', f'{settings}:/mnt:ro', '-v', f'{settings}/pip.conf:/etc/pip.conf:ro',
         '-t', tag, str(context), timeout=1500)
    return time.monotonic() - started


def inspect(tag=TAG):
    """The image's `podman image inspect` record (Config, Healthcheck, Size)."""
    return json.loads(tool('podman', 'image', 'inspect', tag))[0]


def signal_all(pids, number):
    """Signal processes this module started; one that has just ended is no error."""
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def command_line(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return [part.decode('utf-8', 'replace') for part in f.read().split(b'\0')[:-1]]
    except OSError:
        return None


class Container:
    """A buildah working container of the image; commands run in it as the image's USER."""

    def __init__(self, record):
        self.config = record['Config']
        self.healthcheck = record.get('Healthcheck')
        self.name = tool('buildah', 'from', '--pull=never', '--name', 'was-test-' + os.urandom(4).hex(),
                         record['Id']).strip()

    def arguments(self, env, volume):
        """buildah run's options: chroot isolation, the image's USER, `env` and the volume at its VOLUME."""
        options = ['--isolation', 'chroot', '--user', self.config['User']]
        options += [f'--env={name}={value}' for name, value in env.items()]
        if volume is not None:
            options += ['-v', f'{volume}:{next(iter(self.config["Volumes"]))}']
        return options

    def run(self, command, env=None, volume=None, timeout=60):
        """Run a command to its end; the CompletedProcess (the caller judges its status)."""
        return subprocess.run(['buildah', 'run', *self.arguments(env or {}, volume), self.name, '--', *command],
                              capture_output=True, text=True, errors='replace', timeout=timeout)

    def start(self, env, volume, log_path):
        """The image's own CMD, started as its USER with `env`: a Server once it answers as `env` says."""
        return Server(self, env, volume, log_path)

    def mount(self):
        return tool('buildah', 'mount', self.name).strip()

    def remove(self):
        tool('buildah', 'rm', self.name)


class Server:
    """The image's CMD under `buildah run` on a random loopback port (PORT), recognised by its SERVER_NAME."""

    def __init__(self, container, env, volume, log_path):
        self.container, self.volume, self.log_path = container, volume, log_path
        self.command = (container.config.get('Entrypoint') or []) + container.config['Cmd']
        for _attempt in range(5):
            self.port = random.randint(20000, 32000)    # below the ephemeral ports: a probe of a port nobody
                                                        # listens on yet can then never connect to itself
            self.env = {'HOST': '127.0.0.1', **env, 'PORT': str(self.port)}
            self.log = open(log_path, 'w+b')
            self.process = subprocess.Popen(
                ['buildah', 'run', *container.arguments(self.env, volume), container.name, '--', *self.command],
                stdout=self.log, stderr=subprocess.STDOUT)
            wait_for(self.answers_or_ended, 90)
            if self.answers():
                return
            self.stop()
            if 'Address already in use' not in self.output():
                raise ImageError(f'the image did not start (buildah run {container.name}):\n{self.output()[-6000:]}')
        raise ImageError('no free port after 5 tries')

    def answers(self):
        """True once this server (its SERVER_NAME) answers discovery: not merely something on the port."""
        try:
            return self.env['SERVER_NAME'].encode() in self.request('GET', '/web_asset_store.xml', timeout=5)[2]
        except (OSError, http.client.HTTPException):      # not listening yet, or not an HTTP server
            return False

    def answers_or_ended(self):
        return self.process.poll() is not None or self.answers()

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, headers, body) of one HTTP request to the server."""
        return exchange(http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout),
                        method, path, body, headers)

    def pid(self):
        """The process id of the server itself: the descendant of buildah run whose command line is the CMD."""
        found = [pid for pid in descendants(self.process.pid) if command_line(pid) == self.command]
        if len(found) != 1:
            raise ImageError(f'expected one server process under buildah run, found {found}')
        return found[0]

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self):
        """SIGTERM the server (by its pid), let buildah run end, SIGKILL what is left of what we started."""
        if self.process.poll() is None:
            signal_all([pid for pid in descendants(self.process.pid) if command_line(pid) == self.command],
                       signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                signal_all(descendants(self.process.pid) + [self.process.pid], signal.SIGKILL)
                self.process.wait(10)
        self.log.close()


BUILDAH_MARKER = 'run/.containerenv'      # rewritten by buildah itself on every `buildah run`


def snapshot(root, skip=('proc', 'tmp')):
    """Every path under a mounted root file system with its mode, owner, size and modification time;
    not the top-level folders in `skip`, nor buildah's own marker (nor /run's time, which that changes)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        if folder == root:
            dirs[:] = [name for name in dirs if name not in skip]
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            seen[os.path.relpath(path, root)] = (info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns)
    seen.pop(BUILDAH_MARKER, None)
    seen['run'] = seen['run'][:3]
    return seen

