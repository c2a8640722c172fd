"""Prove the originals intact, and keep them so: verify checksums, record missing ones, find duplicates, and
handle the trash.

    python preservation.py [--collection NAME] [--json] verify [--restart] [--max-rate MB] [--nice N]
    python preservation.py [--collection NAME] [--json] record [--dry-run] [--max-rate MB] [--nice N]
    python preservation.py [--collection NAME] [--json] duplicates
    python preservation.py [--collection NAME] [--json] reconcile (--database URL | --names FILE)
                           [--older-than HOURS] [--quarantine] [--dry-run]
    python preservation.py [--collection NAME] [--json] export-bag DIR [--max-rate MB] [--nice N]
    python preservation.py [--collection NAME] [--json] trash list
    python preservation.py [--collection NAME] [--json] trash restore NAME [--id ID] [--dry-run]
    python preservation.py [--collection NAME] [--json] trash purge [--dry-run]

Settings are the server's own (settings.py, then the environment), so the command works on the storage the
live server uses, a folder or a bucket. Every file reported is named; --json prints one JSON document on
standard output instead of lines. A long run shows a progress bar on a terminal and a line every few seconds
in a log, runs at a lower priority (--nice) and reads at most --max-rate megabytes a second, so a live server
stays responsive.

verify re-reads every original and compares its SHA-256 with the one recorded: it reports each original
changed (the bytes differ from the checksum, or an S3 object was replaced without the server), missing (a
checksum is recorded, the original is gone), unreadable, or stored without a checksum. It can be stopped and
started again: it goes on after the last original it finished (--restart starts over). record gives the
originals stored without a checksum one taken now (marked `later`), never to one with evidence of another
(those verify reports changed). duplicates lists the groups of originals with the same SHA-256. reconcile
compares the stored originals with the attachment locations of a Specify database, read-only
(--database mysql://USER:PASSWORD@HOST:PORT/DATABASE: its `attachment` table's AttachmentLocation), or of a
file of them, one a line (--names): it reports orphans (stored, referenced by no attachment, and older than
--older-than hours, at least 24: the last day's uploads may not be in the database yet), missing (referenced,
not stored) and those of them restorable from the trash; --quarantine moves the orphans into the trash.
export-bag writes a BagIt bag (RFC 8493) of a collection's originals into DIR, whose SHA-256 and MD5 manifests
carry the checksums recorded for them (not taken again, so a file changed since its checksum was recorded makes
the bag fail validation, or, when its checksum went with it, an S3 object replaced without the server, is left
out and reported); an original without a recorded checksum is left out and reported (record it first);
a stopped export goes on with the files not yet copied. trash lists
the deleted originals kept, restores one (the latest of that name, or --id) with its checksum from ingest,
or purges those past TRASH_DAYS; restores and purges go to the audit log.

Exit status: 0 when nothing is wrong, 1 when problems were found (or a restore could not be done), 2 for bad
usage or settings, or the storage unreachable.
"""

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
import urllib.parse

import pymysql
import pymysql.cursors

from audit import AuditLog
from checksums import Hashing, LATER
from config import ConfigError, load_config
from errors import StorageUnavailable, UnknownCollection
from files import durable_file, remove_quietly, write_durably
from names import printable
from progress import Progress
from storages import make_storage
from trash import Trash

READ = 1024 * 1024               # bytes read at a time when checksumming
STATE_EVERY = 5                  # seconds between two saves of a verify run's state (for resuming)


class Usage(Exception):
    """Bad usage or settings, or a storage that cannot be reached: exit status 2."""


# --- Reading, throttled -------------------------------------------------------------------------------------

class Throttle:
    """At most `rate` bytes a second over the run (None: no bound)."""

    def __init__(self, megabytes: float | None) -> None:
        self.rate = megabytes * 1e6 if megabytes else None
        self.started, self.read = time.monotonic(), 0

    def took(self, size: int) -> None:
        self.read += size
        if self.rate:
            ahead = self.read / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def sha256_of(storage, coll, name, throttle):
    """(SHA-256 hex, bytes) of the stored original, read once."""
    digest, size = hashlib.sha256(), 0
    with storage.open(coll, name) as original:
        for chunk in iter(lambda: original.read(READ), b''):
            digest.update(chunk)
            size += len(chunk)
            throttle.took(len(chunk))
    return digest.hexdigest(), size


def checksum_of(storage, coll, name, throttle):
    """A checksum taken now of the stored original (SHA-256 and MD5), to be recorded as taken later."""
    hashing = Hashing()
    with storage.open(coll, name) as original:
        for chunk in iter(lambda: original.read(READ), b''):
            hashing.update(chunk)
            throttle.took(len(chunk))
    return hashing.checksum(LATER)


# --- verify ---------------------------------------------------------------------------------------------------

def expected_sha256(storage, coll, name, catalogued):
    """The SHA-256 the original should have: recorded for its current version, else any recorded of that name (a
    catalogue entry of another size, an index entry of an S3 object replaced without the server); None: none."""
    recorded = storage.checksum(coll, name)
    return recorded.sha256 if recorded else catalogued.get(name)


def verify_collection(storage, coll, state, progress, throttle, save_state):
    """Check one collection's originals from where `state` says the last run stopped; problems go into it."""
    catalogued = storage.catalogued(coll)
    names = sorted(storage.originals(coll))
    done = state['done'].get(str(coll))
    for name in names:
        if done is not None and name <= done:
            progress.advance()
            continue
        problem = verify_one(storage, coll, name, catalogued, throttle)
        if problem:
            state['problems'].append(problem)
            progress.say(f"{problem['problem']}: {shown(coll, name)}")
        else:
            state['ok'] += 1
        state['done'][str(coll)] = name
        progress.advance()
        save_state()
    stored = set(names)
    for name in sorted(set(catalogued) - stored):
        if not any(p['name'] == name and p['collection'] == coll for p in state['problems']):
            state['problems'].append({'collection': coll, 'name': name, 'problem': 'missing',
                                      'expected': catalogued[name]})
            progress.say(f'missing: {shown(coll, name)}')


def verify_one(storage, coll, name, catalogued, throttle):
    """The problem with one original, or None when it matches its checksum."""
    try:
        expected = expected_sha256(storage, coll, name, catalogued)
        if expected is None:
            return {'collection': coll, 'name': name, 'problem': 'no checksum'}
        found, _size = sha256_of(storage, coll, name, throttle)
    except FileNotFoundError:
        return {'collection': coll, 'name': name, 'problem': 'missing', 'expected': catalogued.get(name)}
    except OSError as error:
        return {'collection': coll, 'name': name, 'problem': 'unreadable', 'error': error.strerror or str(error)}
    if found != expected:
        return {'collection': coll, 'name': name, 'problem': 'changed', 'expected': expected, 'found': found}
    return None


def verify(config, storage, colls, args):
    """The verify report, resuming a stopped run unless --restart."""
    path = os.path.join(config.BASE_DIR, '.preservation-verify.json')
    state = None if args.restart else read_state(path, colls)
    state = state or {'collections': [str(c) for c in colls], 'done': {}, 'ok': 0, 'problems': []}
    throttle = Throttle(args.max_rate)
    saved = [time.monotonic()]

    def save_state(force=False):
        if force or time.monotonic() - saved[0] >= STATE_EVERY:
            write_durably(path, json.dumps(state).encode('utf-8'))
            saved[0] = time.monotonic()
    total = sum(1 for coll in colls for _ in storage.originals(coll))
    progress = Progress(total, sys.stderr, 'originals')
    try:
        for coll in colls:
            verify_collection(storage, coll, state, progress, throttle, save_state)
    except BaseException:
        save_state(force=True)
        raise
    finally:
        progress.close()
    remove_quietly(path)
    counts = {'ok': state['ok']}
    for problem in state['problems']:
        counts[problem['problem']] = counts.get(problem['problem'], 0) + 1
    return {'command': 'verify', 'counts': counts, 'problems': state['problems']}


def read_state(path, colls):
    """The state a stopped verify run left for these collections, or None."""
    try:
        with open(path, encoding='utf-8') as f:
            state = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return state if state.get('collections') == [str(c) for c in colls] else None


# --- record ---------------------------------------------------------------------------------------------------

def record(storage, colls, args):
    """Record a checksum taken now for every original stored without one and without evidence of another."""
    throttle, recorded, skipped = Throttle(args.max_rate), [], []
    todo = []
    for coll in colls:
        catalogued = storage.catalogued(coll)
        todo += [(coll, name) for name in sorted(storage.originals(coll))
                 if name not in catalogued and storage.checksum(coll, name) is None]
    progress = Progress(len(todo), sys.stderr, 'originals')
    try:
        for coll, name in todo:
            try:
                identity = storage.original_identity(coll, name)
                checksum = checksum_of(storage, coll, name, throttle)
                if args.dry_run or storage.record_checksum(coll, name, checksum, identity):
                    recorded.append({'collection': coll, 'name': name, 'sha256': checksum.sha256})
                else:
                    skipped.append({'collection': coll, 'name': name, 'problem': 'changed while it was read'})
            except FileNotFoundError:
                skipped.append({'collection': coll, 'name': name, 'problem': 'gone while it was read'})
            except OSError as error:
                skipped.append({'collection': coll, 'name': name, 'problem': 'unreadable',
                                'error': error.strerror or str(error)})
            progress.advance()
    finally:
        progress.close()
    return {'command': 'record', 'dryRun': args.dry_run, 'recorded': recorded, 'problems': skipped}


# --- duplicates -----------------------------------------------------------------------------------------------

def duplicates(storage, colls):
    """Groups of originals (within each collection) whose recorded SHA-256 is the same."""
    groups = []
    for coll in colls:
        by_sha256 = {}
        for name in sorted(storage.originals(coll)):
            checksum = storage.checksum(coll, name)
            if checksum:
                by_sha256.setdefault(checksum.sha256, []).append(name)
        groups += [{'collection': coll, 'sha256': sha256, 'names': names}
                   for sha256, names in sorted(by_sha256.items()) if len(names) > 1]
    return {'command': 'duplicates', 'groups': groups, 'problems': groups}


# --- reconcile ------------------------------------------------------------------------------------------------

MIN_AGE_HOURS = 24               # an original younger than this is never an orphan (the database may lag behind)

now = time.time                  # the clock orphans are aged by


def database_names(url):
    """The AttachmentLocation of every attachment in a Specify database (MariaDB/MySQL), read in a read-only
    transaction, streamed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('mysql', 'mariadb') or not parts.hostname or not parts.path.strip('/'):
        raise Usage('--database must be mysql://USER:PASSWORD@HOST:PORT/DATABASE')
    try:
        connection = pymysql.connect(host=parts.hostname, port=parts.port or 3306,
                                     user=urllib.parse.unquote(parts.username or ''),
                                     password=urllib.parse.unquote(parts.password or ''),
                                     database=urllib.parse.unquote(parts.path.strip('/')), charset='utf8mb4',
                                     connect_timeout=10, read_timeout=600, cursorclass=pymysql.cursors.SSCursor)
    except pymysql.MySQLError as error:
        raise Usage(f'cannot read the database: {error.args[-1]}') from None
    try:
        with connection.cursor() as cursor:
            cursor.execute('START TRANSACTION READ ONLY')
            cursor.execute('SELECT AttachmentLocation FROM attachment WHERE AttachmentLocation IS NOT NULL')
            return {location for (location,) in cursor if location}
    except pymysql.MySQLError as error:
        raise Usage(f'cannot read the attachment table: {error.args[-1]}') from None
    finally:
        connection.close()


def listed_names(path):
    """The attachment locations of a file, one a line (blank lines and surrounding spaces ignored)."""
    try:
        with open(path, encoding='utf-8') as f:
            return {line.strip() for line in f if line.strip()}
    except (OSError, UnicodeDecodeError) as error:
        raise Usage(f'cannot read --names {path}: {error}') from None


def reconcile(storage, audit, colls, args):
    """Orphans, missing and restorable: the stored originals against the names referenced."""
    if args.older_than < MIN_AGE_HOURS:
        raise Usage(f'--older-than must be at least {MIN_AGE_HOURS} hours (the database may lag behind uploads)')
    referenced = database_names(args.database) if args.database else listed_names(args.names)
    cutoff = now() - args.older_than * 3600
    report = {'command': 'reconcile', 'dryRun': args.dry_run, 'referenced': len(referenced), 'stored': 0,
              'recent': [], 'problems': [], 'quarantined': []}
    stored = set()
    for coll in colls:
        for name, modified in sorted(storage.originals_modified(coll)):
            stored.add(name)
            report['stored'] += 1
            if name in referenced:
                continue
            if modified > cutoff:
                report['recent'].append({'collection': coll, 'name': name})
                continue
            report['problems'].append({'collection': coll, 'name': name, 'problem': 'orphan'})
    trashed = {entry.name: (coll, entry) for coll in colls for entry in storage.trashed(coll)}
    for name in sorted(referenced - stored):
        if name in trashed:
            coll, entry = trashed[name]
            report['problems'].append({'collection': coll, 'name': name, 'problem': 'missing, restorable',
                                       'id': entry.id})
        else:
            report['problems'].append({'collection': None if len(colls) > 1 else colls[0], 'name': name,
                                       'problem': 'missing'})
    if args.quarantine:
        for orphan in [p for p in report['problems'] if p['problem'] == 'orphan']:
            entry = None if args.dry_run else storage.trash(orphan['collection'], orphan['name'])
            if entry:
                audit.record('quarantine', orphan['collection'], orphan['name'], size=entry.size,
                             sha256=entry.checksum and entry.checksum.sha256, trash=entry.id,
                             client='preservation.py')
            if entry or args.dry_run:
                report['quarantined'].append({**orphan, 'id': entry and entry.id})
    return report


# --- export-bag -----------------------------------------------------------------------------------------------

BAGIT = 'BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n'


def manifest_path(name):
    """A payload file's path as a manifest line names it: CR and LF percent-encoded, as bagit-python writes and
    reads them (RFC 8493 2.1.3 encodes % too, which bagit-python 1.9 does not decode: docs/limits.md)."""
    return 'data/' + name.replace('\r', '%0D').replace('\n', '%0A')


def export_bag(config, storage, colls, args):
    """A bag of one collection's originals in args.directory, with the checksums recorded for them."""
    if len(colls) != 1:
        raise Usage('export-bag needs --collection (COLLECTION_DIRS names several; a bag holds one collection)')
    coll, folder = colls[0], os.path.abspath(args.directory)
    if os.path.exists(os.path.join(folder, 'bagit.txt')):
        raise Usage(f'{folder} already holds a bag')
    if os.path.isdir(folder) and set(os.listdir(folder)) - {'data'}:
        raise Usage(f'{folder} is not empty')
    payload = os.path.join(folder, 'data')
    os.makedirs(payload, exist_ok=True)
    throttle, lines, left_out, total = Throttle(args.max_rate), [], [], 0
    names, catalogued = sorted(storage.originals(coll)), storage.catalogued(coll)
    progress = Progress(len(names), sys.stderr, 'originals')
    try:
        for name in names:
            checksum = storage.checksum(coll, name)
            if checksum is None:
                problem = 'changed since its checksum was recorded' if name in catalogued else 'no checksum'
                left_out.append({'collection': coll, 'name': name, 'problem': problem + ': left out'})
                progress.say(f'{problem}, left out: {shown(coll, name)}')
            else:
                copy_into_bag(storage, coll, name, os.path.join(payload, name), checksum.size, throttle)
                lines.append((name, checksum))
                total += checksum.size
            progress.advance()
    finally:
        progress.close()
    for stray in set(os.listdir(payload)) - {name for name, _ in lines}:     # a file left out, copied before
        os.remove(os.path.join(payload, stray))
    write_tag_files(folder, coll, lines, total)
    return {'command': 'export-bag', 'bag': folder, 'files': len(lines), 'bytes': total, 'problems': left_out}


def copy_into_bag(storage, coll, name, target, size, throttle):
    """Copy an original into the bag's payload, complete or not at all; one already there at its size is kept
    (a stopped export goes on)."""
    if os.path.isfile(target) and os.path.getsize(target) == size:
        return
    with storage.open(coll, name) as original, durable_file(target) as out:
        for chunk in iter(lambda: original.read(READ), b''):
            out.write(chunk)
            throttle.took(len(chunk))


def write_tag_files(folder, coll, lines, total):
    """bagit.txt, the payload manifests, bag-info.txt and the tag manifest, each written complete."""
    tags = {
        'bagit.txt': BAGIT,
        'manifest-sha256.txt': ''.join(f'{c.sha256}  {manifest_path(n)}\n' for n, c in lines),
        'manifest-md5.txt': ''.join(f'{c.md5}  {manifest_path(n)}\n' for n, c in lines),
        'bag-info.txt': (f'Bagging-Date: {datetime.date.today().isoformat()}\n'
                         f'Payload-Oxum: {total}.{len(lines)}\n'
                         f'External-Description: Originals of {"all collections" if coll is None else coll}, '
                         f'with the checksums recorded when they were stored\n'
                         f'Bag-Software-Agent: Web Asset Server for Specify (preservation.py export-bag)\n'),
    }
    for name, text in tags.items():
        write_durably(os.path.join(folder, name), text.encode('utf-8'))
    tag_manifest = ''.join(f'{hashlib.sha256(text.encode("utf-8")).hexdigest()}  {name}\n'
                           for name, text in sorted(tags.items()))
    write_durably(os.path.join(folder, 'tagmanifest-sha256.txt'), tag_manifest.encode('utf-8'))


# --- trash ----------------------------------------------------------------------------------------------------

def trash_entry(coll, entry):
    return {'collection': coll, 'id': entry.id, 'name': entry.name, 'size': entry.size,
            'deleted': datetime.datetime.fromtimestamp(entry.deleted, datetime.timezone.utc).isoformat(),
            'sha256': entry.checksum and entry.checksum.sha256}


def trash_command(storage, audit, trash, colls, args):
    if args.trash_action == 'list':
        entries = [trash_entry(coll, entry) for coll in colls for entry in storage.trashed(coll)]
        return {'command': 'trash list', 'entries': entries, 'bytes': sum(e['size'] for e in entries), 'problems': []}
    if args.trash_action == 'purge':
        now = time.time()
        due = [(coll, entry) for coll in colls for entry in trash.expired(coll, now)]
        if not args.dry_run:
            for coll, entry in due:
                storage.purge(coll, entry.id)
                audit.record('purge', coll, entry.name, size=entry.size,
                             sha256=entry.checksum and entry.checksum.sha256, trash=entry.id, client='preservation.py')
        return {'command': 'trash purge', 'dryRun': args.dry_run,
                'purged': [trash_entry(coll, entry) for coll, entry in due], 'problems': []}
    return restore(storage, audit, colls, args)


def restore(storage, audit, colls, args):
    """Restore the latest trash entry of NAME (or the one --id names) in the collection."""
    if len(colls) != 1:
        raise Usage('trash restore needs --collection (COLLECTION_DIRS names several)')
    coll = colls[0]
    entries = [e for e in storage.trashed(coll) if e.name == args.name and (args.id is None or e.id == args.id)]
    report = {'command': 'trash restore', 'dryRun': args.dry_run, 'restored': [], 'problems': []}
    if not entries:
        report['problems'].append({'collection': coll, 'name': args.name, 'problem': 'not in the trash'})
        return report
    entry = entries[-1]
    if storage.exists(coll, entry.name):
        report['problems'].append({'collection': coll, 'name': entry.name, 'problem': 'stored again since',
                                   'id': entry.id})
        return report
    if not args.dry_run:
        try:
            storage.restore(coll, entry.id)
        except FileExistsError:
            report['problems'].append({'collection': coll, 'name': entry.name, 'problem': 'stored again since',
                                       'id': entry.id})
            return report
        audit.record('restore', coll, entry.name, size=entry.size, sha256=entry.checksum and entry.checksum.sha256,
                     trash=entry.id, client='preservation.py')
    report['restored'].append(trash_entry(coll, entry))
    return report


# --- Running it -----------------------------------------------------------------------------------------------

def shown(coll, name):
    return printable(name if coll is None else f'{coll}/{name}')


def collections(config, chosen):
    """The collections to work on: the one chosen, or one name per collection folder (None: the one folder)."""
    if config.COLLECTION_DIRS is None:
        if chosen is not None:
            raise Usage('--collection needs COLLECTION_DIRS (without it there is one folder for all)')
        return [None]
    if chosen is None:
        return list({folder: coll for coll, folder in config.COLLECTION_DIRS.items()}.values())
    if chosen not in config.COLLECTION_DIRS:
        raise Usage(f'--collection {chosen!r} is not in COLLECTION_DIRS')
    return [chosen]


def arguments(argv):
    parser = argparse.ArgumentParser(prog='preservation.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--collection', help='only this collection (a COLLECTION_DIRS name)')
    parser.add_argument('--json', action='store_true', help='one JSON document on standard output')
    commands = parser.add_subparsers(dest='command', required=True)
    for name in ('verify', 'record', 'export-bag'):
        command = commands.add_parser(name)
        command.add_argument('--max-rate', type=float, default=None, metavar='MB',
                             help='read at most this many megabytes a second')
        command.add_argument('--nice', type=int, default=10, help='lower priority (default 10)')
    commands.choices['verify'].add_argument('--restart', action='store_true', help='start over, not where it stopped')
    commands.choices['record'].add_argument('--dry-run', action='store_true', help='record nothing, say what')
    commands.choices['export-bag'].add_argument('directory', metavar='DIR', help='the bag to make (empty, or new)')
    commands.add_parser('duplicates')
    reconciling = commands.add_parser('reconcile')
    source = reconciling.add_mutually_exclusive_group(required=True)
    source.add_argument('--database', metavar='URL', help='mysql://USER:PASSWORD@HOST:PORT/DATABASE (read only)')
    source.add_argument('--names', metavar='FILE', help='attachment locations, one a line')
    reconciling.add_argument('--older-than', type=float, default=MIN_AGE_HOURS, metavar='HOURS',
                             help=f'orphans only older than this (default and least: {MIN_AGE_HOURS})')
    reconciling.add_argument('--quarantine', action='store_true', help='move the orphans into the trash')
    reconciling.add_argument('--dry-run', action='store_true', help='with --quarantine: move nothing, say what')
    trash = commands.add_parser('trash').add_subparsers(dest='trash_action', required=True)
    trash.add_parser('list')
    restoring = trash.add_parser('restore')
    restoring.add_argument('name')
    restoring.add_argument('--id', help='the trash entry to restore (default: the latest of NAME)')
    restoring.add_argument('--dry-run', action='store_true', help='restore nothing, say what')
    trash.add_parser('purge').add_argument('--dry-run', action='store_true', help='purge nothing, say what')
    return parser.parse_args(argv)


def run(args, config):
    storage = make_storage(config)
    if storage.health() != 'ok':
        raise Usage(f'the storage is {storage.health()}')
    colls = collections(config, args.collection)
    if args.command == 'verify':
        return verify(config, storage, colls, args)
    if args.command == 'record':
        return record(storage, colls, args)
    if args.command == 'duplicates':
        return duplicates(storage, colls)
    if args.command == 'export-bag':
        return export_bag(config, storage, colls, args)
    audit = AuditLog(config.AUDIT_LOG)
    if args.command == 'reconcile':
        return reconcile(storage, audit, colls, args)
    return trash_command(storage, audit, Trash(config, storage, audit), colls, args)


def as_lines(report):
    """The report as lines for a person: one per file reported, then the counts."""
    lines = []
    for key in ('problems', 'recorded', 'restored', 'purged', 'entries', 'quarantined'):
        for item in report.get(key, []) if key != 'problems' or report['command'] != 'duplicates' else []:
            what = {'quarantined': 'quarantined'}.get(key) or item.get('problem') or {
                'recorded': 'recorded', 'restored': 'restored', 'purged': 'purged', 'entries': 'in the trash'}[key]
            extra = f" ({item['id']}, deleted {item['deleted']})" if 'deleted' in item else ''
            lines.append(f"{what}: {shown(item['collection'], item['name'])}{extra}")
    for group in report.get('groups', []):
        lines.append(f"same SHA-256 {group['sha256']}: " + ', '.join(shown(group['collection'], n)
                                                                      for n in group['names']))
    if 'counts' in report:
        lines.append(', '.join(f'{count} {what}' for what, count in report['counts'].items()))
    if report['command'] == 'trash list':
        lines.append(f"{len(report['entries'])} in the trash, {report['bytes']} bytes")
    return lines or ['nothing to report']


def main(argv=None, environ=None):
    args = arguments(argv)
    if getattr(args, 'nice', 0):
        os.nice(args.nice)
    try:
        report = run(args, load_config(environ=environ))
    except (ConfigError, Usage, UnknownCollection) as error:
        print(f'preservation: {error}', file=sys.stderr)
        return 2
    except StorageUnavailable as error:
        print(f'preservation: {error}; run it again when that is mended', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('preservation: interrupted; run it again to go on where it stopped', file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else '\n'.join(as_lines(report)))
    return 1 if report['problems'] else 0


if __name__ == '__main__':
    sys.exit(main())
