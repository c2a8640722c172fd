"""The shared key, the tokens Specify signs each request with, and viewer grants.

A token is hex HMAC-MD5(key, str(timestamp) + name) + ':' + timestamp, as Specify 6 and 7 make it; a grant
lets a browser's viewer fetch one original's IIIF tiles for a while without the key. Tokens are compared in
constant time and the key is never logged.
"""

import collections
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time

from config import ConfigError
from files import fsync_folder, remove_quietly
from names import TEMP_PREFIX

log = logging.getLogger('web_asset_server')


# --- The key ----------------------------------------------------------------------------------------------------

def resolve_key(config):
    """The key tokens are checked with: configured, kept in KEY_FILE, or made there now."""
    if config.AUTH_DISABLED:
        log.warning('AUTH_DISABLED is set: anyone who can reach this server may read, '
                    'write and delete attachments.')
        return None
    if config.KEY:
        return config.KEY
    path = config.KEY_FILE or os.path.join(config.BASE_DIR, '.web-asset-server.key')
    return read_kept_key(path) or keep_new_key(path)


def read_kept_key(path):
    """The key kept in `path`, or None when there is no such file. An empty one stops the start: only an
    admin can tell whether Specify knows a key that was lost from it."""
    try:
        with open(path, encoding='utf-8') as kept:
            key = kept.read().strip()
    except FileNotFoundError:
        return None
    if not key:
        raise ConfigError(f'the key file {path} is empty: put the attachment key Specify uses into it, '
                          'or remove the file to have a new key made (then give Specify the new key)')
    log.info('Using the attachment key kept in %s.', path)
    return key


def keep_new_key(path):
    """A new random key, written and synced in full before it appears at `path` (linked, never replacing)."""
    key = secrets.token_urlsafe(32)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f'{TEMP_PREFIX}{secrets.token_hex(8)}.key')
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, 'w', encoding='utf-8') as kept:
            kept.write(key + '\n')
            kept.flush()
            os.fsync(kept.fileno())
        os.link(temp, path)
    except FileExistsError:          # another instance made it first: use theirs
        return read_kept_key(path) or keep_new_key(path)
    except OSError as error:         # e.g. a file system without hard links
        raise ConfigError(f'cannot keep a new key in {path} ({error.strerror or error}): '
                          'set KEY (or ATTACHMENT_KEY), or KEY_FILE to a file on another file system') from None
    finally:
        remove_quietly(temp)
    fsync_folder(folder)
    log.warning('No KEY was configured, so a new random key was made and kept in %s. '
                'Put it into Specify as attachment.key (Specify 6) or ASSET_SERVER_KEY '
                '(Specify 7), or set KEY / ATTACHMENT_KEY to choose your own.', path)
    return key


# --- Tokens -----------------------------------------------------------------------------------------------------

TIMESTAMP = re.compile(r'0|-?[1-9][0-9]{0,19}')    # canonical: as str(int) writes it, ASCII digits only


def make_token(key, name, timestamp=None):
    """A token as clients make it: hex HMAC-MD5 of str(ts) + name, then ':ts'."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(key.encode('utf-8'), f'{timestamp}{name}'.encode('utf-8'), hashlib.md5)
    return f'{digest.hexdigest()}:{timestamp}'


def token_problem(key, token, name, started, tolerance):
    """Why `token` does not sign `name` at time `started`, or None when it does."""
    if key is None:
        return None
    if not token:
        return 'Missing token.'
    digest, _, timestamp = token.rpartition(':')
    if not digest or not TIMESTAMP.fullmatch(timestamp):
        return 'Malformed token.'
    if tolerance is not None and abs(started - int(timestamp)) >= tolerance:
        return 'Token expired: check the clocks of client and server.'
    expected = make_token(key, name or '', timestamp).partition(':')[0]
    if not hmac.compare_digest(expected.encode(), digest.encode('utf-8', 'replace')):
        return 'Bad token.'
    return None


class ReadTokens:
    """Tokens presented for reading, until their window ends (at most `most`, the oldest forgotten first): a
    token that went into a URL, a browser's history or a proxy's log to read a file cannot then replace or delete
    it. Specify mints a fresh token for every write, so only a write in the very second of a read of the same
    name (the same token) is refused."""

    def __init__(self, most):
        self.most, self.tokens, self.lock = most, collections.OrderedDict(), threading.Lock()

    def note(self, token, now, tolerance):
        """Remember a token a request read with (until it expires; with no window, until forgotten)."""
        timestamp = int(token.rpartition(':')[2])
        with self.lock:
            self.tokens[token] = None if tolerance is None else timestamp + tolerance
            self.tokens.move_to_end(token)
            while self.tokens and (len(self.tokens) > self.most or self.expired(next(iter(self.tokens)), now)):
                self.tokens.popitem(last=False)

    def expired(self, token, now):
        ends = self.tokens[token]
        return ends is not None and ends <= now

    def read_with(self, token):
        with self.lock:
            return token in self.tokens


# --- Viewer grants ----------------------------------------------------------------------------------------------

GRANT = re.compile(r'([0-9]{1,12})\.([0-9a-f]{32})')

GRANT_STEP = 60                  # grants are minted to the next whole minute, so one minute's tiles share URLs


def make_grant(key, coll, name, expires):
    """A viewer's grant for one original until `expires` (epoch seconds): '<expires>.<HMAC-SHA256, 32 hex>'."""
    message = f'iiif-grant\0{expires}\0{coll or ""}\0{name}'.encode('utf-8', 'surrogatepass')
    return f'{expires}.{hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()[:32]}'


def new_grant(key, coll, name, now, lifetime):
    expires = -(-(int(now) + lifetime) // GRANT_STEP) * GRANT_STEP
    return make_grant(key, coll, name, expires)


def grant_problem(key, grant, coll, name, now, lifetime):
    """Why `grant` does not let a viewer see this original now, or None when it does."""
    if key is None:
        return None
    match = GRANT.fullmatch(grant)
    if not match:
        return 'Malformed viewer grant.'
    expires = int(match.group(1))
    if not now < expires <= now + lifetime + GRANT_STEP:
        return 'The viewer grant has expired: open the image again.'
    if not hmac.compare_digest(make_grant(key, coll, name, expires).encode(), grant.encode()):
        return 'Bad viewer grant.'
    return None
