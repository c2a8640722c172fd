"""Configuration: settings.py, then the environment, checked once at start so that a bad setting stops the
start with one clear line instead of failing requests later."""

import ipaddress
import json
import os
import re
import types

import settings
from names import RECORD_FOLDERS, name_problem

VERSION = '1.1.0'                # This release, as the capabilities document says; raise the image tag with it.
HERE = os.path.dirname(os.path.abspath(__file__))

ENV_ALIASES = {'ATTACHMENT_KEY': 'KEY', 'DEBUG_MODE': 'DEBUG'}

OPTIONAL_TYPES = {'SERVER_PORT': int, 'THUMBNAIL_WORKERS': int, 'TIME_TOLERANCE': int,
                  'COLLECTION_DIRS': json.loads}   # the rest: text

SCALE_LISTS = {'PREGENERATE_SCALE'}   # a number, a JSON list or numbers separated by commas

TEXT_LISTS = {'TRUSTED_PROXIES'}      # a JSON list or words separated by commas

TRUE_WORDS, FALSE_WORDS = {'1', 'true', 'yes', 'on'}, {'0', 'false', 'no', 'off'}


class ConfigError(Exception):
    """A setting that the server cannot start with."""


def parse_setting(name, raw, default):
    """Turn an environment variable's text into the type of the setting's default."""
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in TRUE_WORDS | FALSE_WORDS:
                return text.lower() in TRUE_WORDS
            raise ValueError('expected true or false')
        kind = type(default) if default is not None else OPTIONAL_TYPES.get(name, str)
        if text.lower() in ('', 'none', 'null'):
            return None
        if name in SCALE_LISTS:
            return json.loads(text) if text.startswith('[') else [int(part) for part in text.split(',')]
        if name in TEXT_LISTS:
            return json.loads(text) if text.startswith('[') else [part.strip() for part in text.split(',')]
        if kind in (list, dict, set):
            return json.loads(text)
        return kind(text)
    except ValueError as error:
        raise ConfigError(f'setting {name}: cannot read {raw!r} ({error})') from None


def load_config(overrides=None, environ=None):
    """Settings from settings.py, then environment variables, then overrides (tests)."""
    environ = os.environ if environ is None else environ
    values = {name: getattr(settings, name) for name in dir(settings) if name.isupper()}
    for env_name, name in list(ENV_ALIASES.items()) + [(n, n) for n in values]:
        if env_name in environ:
            values[name] = parse_setting(name, environ[env_name], getattr(settings, name))
    values.update(overrides or {})
    config = types.SimpleNamespace(**values)
    config.BASE_DIR = os.path.abspath(os.path.join(HERE, os.path.expanduser(config.BASE_DIR)))
    config.AUDIT_LOG = os.path.join(config.BASE_DIR, os.path.expanduser(str(config.AUDIT_LOG)))
    config.SERVER_PORT = config.SERVER_PORT or config.PORT
    config.CAN_THUMBNAIL = set(config.CAN_THUMBNAIL or ())
    config.THUMBNAIL_WORKERS = config.THUMBNAIL_WORKERS or os.cpu_count() or 1
    check_config(config)
    return config


def check_config(config):
    """Refuse settings that would let names escape BASE_DIR or make no sense."""
    for name in ('ORIG_DIR', 'THUMB_DIR'):
        if name_problem(getattr(config, name)):
            raise ConfigError(f'setting {name} must be a single folder name')
    if config.TIME_TOLERANCE is None and config.NO_TIME_WINDOW_ACKNOWLEDGED is not True:
        raise ConfigError('setting TIME_TOLERANCE is none, so tokens would never expire: set it to seconds, or set '
                          'NO_TIME_WINDOW_ACKNOWLEDGED to true (see docs/settings.md)')
    for name in ('ORIG_DIR', 'THUMB_DIR'):
        if getattr(config, name) in RECORD_FOLDERS:
            raise ConfigError(f'setting {name} may not be {getattr(config, name)}, where the server keeps its records')
    if config.ORIG_DIR == config.THUMB_DIR:
        raise ConfigError('settings ORIG_DIR and THUMB_DIR must name different folders (a thumbnail would '
                          'overwrite an original named like it)')
    if config.COLLECTION_DIRS is not None:
        if not isinstance(config.COLLECTION_DIRS, dict):
            raise ConfigError('setting COLLECTION_DIRS must map collection names to folder names')
        for coll, folder in config.COLLECTION_DIRS.items():
            if not isinstance(folder, str) or name_problem(folder):
                raise ConfigError(f'COLLECTION_DIRS[{coll!r}] must be a single folder name')
    for name in ('PORT', 'SERVER_PORT', 'MAX_UPLOAD_SIZE', 'MAX_THUMBNAIL_SCALE', 'THUMBNAIL_WORKERS',
                 'THUMBNAIL_TIMEOUT', 'THUMBNAIL_MAX_PIXELS', 'THREADS', 'SOCKET_TIMEOUT', 'THUMBNAIL_QUEUE_WAIT',
                 'THUMBNAIL_ADDRESS_SPACE_LIMIT', 'THUMBNAIL_FAILURES_REMEMBERED', 'METADATA_WORKERS',
                 'METADATA_WAIT', 'METADATA_TIMEOUT', 'METADATA_MEMORY_LIMIT', 'METADATA_MAX_READ',
                 'METADATA_MAX_VALUE', 'METADATA_MAX_ANSWER', 'REQUEST_HEAD_TIMEOUT', 'REQUEST_BODY_GRACE',
                 'REQUEST_BODY_MIN_RATE', 'ANSWER_GRACE', 'ANSWER_MIN_RATE', 'MAX_CONNECTIONS',
                 'MAX_CONNECTIONS_PER_CLIENT', 'MAX_REQUESTS_PER_CLIENT', 'THUMBNAIL_OTHER_SCALES',
                 'THUMBNAIL_OTHER_SCALES_ORIGINALS', 'IIIF_MAX_SIZE', 'IIIF_GRANT_SECONDS'):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ConfigError(f'setting {name} must be a whole number above 0')
    config.PREGENERATE_SCALES = pregenerated_scales(config)
    config.THUMBNAIL_CACHE_BOUND = cache_bound(config.THUMBNAIL_CACHE_MAX_BYTES)
    for name in ('THUMBNAIL_QUEUE', 'TRASH_DAYS'):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            raise ConfigError(f'setting {name} must be a whole number, 0 or more')
    if config.THREADS < 5:
        raise ConfigError('setting THREADS must be at least 5 (Paste keeps 5 spare threads)')
    if config.PUBLIC_SCHEME not in ('http', 'https'):
        raise ConfigError('setting PUBLIC_SCHEME must be http or https')
    if config.STORAGE not in ('disk', 's3'):
        raise ConfigError('setting STORAGE must be disk or s3')
    if config.STORAGE == 's3' and not config.S3_BUCKET:
        raise ConfigError('setting S3_BUCKET must name a bucket when STORAGE is s3')
    if config.FILE_OFFLOAD not in (None, 'nginx', 'apache'):
        raise ConfigError('setting FILE_OFFLOAD must be none, nginx or apache')
    if config.FILE_OFFLOAD and config.STORAGE != 'disk':
        raise ConfigError('setting FILE_OFFLOAD works with disk storage only')
    config.TRUSTED_NETWORKS = trusted_networks(config.TRUSTED_PROXIES)


def trusted_networks(listed):
    """TRUSTED_PROXIES as address networks (a bare address is a network of one)."""
    if listed is None:
        return ()
    if not isinstance(listed, (list, tuple)):
        raise ConfigError('setting TRUSTED_PROXIES must be a list of addresses or networks, or none')
    try:
        return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in listed if str(item).strip())
    except ValueError as error:
        raise ConfigError(f'setting TRUSTED_PROXIES: {error}') from None


def conversion_threads(config):
    """Threads that may wait for or run conversions at once: THUMBNAIL_WORKERS + THUMBNAIL_QUEUE, leaving
    five of THREADS (at least one) to every other request."""
    return min(config.THUMBNAIL_WORKERS + config.THUMBNAIL_QUEUE, max(1, config.THREADS - 5))


SHARE = re.compile(r'([1-9][0-9]{0,3})%')


def cache_bound(value):
    """(bytes, share of the originals' bytes) that THUMBNAIL_CACHE_MAX_BYTES names: a whole number of bytes (text
    of digits too, from the environment), 'N%', or None for neither."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value, None
    if isinstance(value, str) and SHARE.fullmatch(value):
        return None, int(value[:-1]) / 100
    raise ConfigError("setting THUMBNAIL_CACHE_MAX_BYTES must be a whole number of bytes above 0, a share of the "
                      "originals' bytes such as '100%', or None")


def pregenerated_scales(config):
    """PREGENERATE_SCALE as a list, largest first (each smaller one is then made from it)."""
    chosen = config.PREGENERATE_SCALE
    scales = [] if chosen is None else chosen if isinstance(chosen, list) else [chosen]
    if not all(type(scale) is int and 1 <= scale <= config.MAX_THUMBNAIL_SCALE for scale in scales):
        raise ConfigError(f'setting PREGENERATE_SCALE must be scales from 1 to MAX_THUMBNAIL_SCALE '
                          f'({config.MAX_THUMBNAIL_SCALE}), or none')
    return sorted(set(scales), reverse=True)
