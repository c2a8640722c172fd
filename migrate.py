"""Copy an attachments folder into an S3 bucket, or a bucket back into a folder.

    python migrate.py to-s3   [--folder DIR] [--dry-run] [--overwrite]
    python migrate.py from-s3 [--folder DIR] [--dry-run]

The folder (default BASE_DIR) is in the upstream layout, with or without collection folders:
originals/ and thumbnails/ directly in it, or in <collection folder>/ below it. The bucket and
prefix come from the server's settings (S3_BUCKET, S3_PREFIX, S3_ENDPOINT_URL, ... in settings.py
or the environment); keys mirror the folder, as the server expects them.

It is resumable: a file whose copy already exists with the same size and checksum is skipped,
so an interrupted run can simply be started again. Every copy is verified after it is made: the
size, and the checksum the store computed (its ETag: the MD5 of the bytes, or of the MD5s of the
parts for a multipart upload) against one computed here. Nothing is written with --dry-run.

An object in the bucket with other bytes than the folder's file is left as it is and reported as
a conflict (the server may have written it since the switch), unless --overwrite is given.
Thumbnails are copied only when fresh (made from their original's current bytes), and stay fresh
as the server judges it on the other side: to the bucket with the original's ETag recorded, back
to disk with modification times no older than their originals' (originals get their objects'
LastModified). Symbolic links are never followed, and a name that is not UTF-8 is not copied:
both are named on standard error, counted and skipped.
"""

import argparse
import datetime
import errno
import hashlib
import os
import re
import stat
import sys
import types

from config import ConfigError, load_config
from errors import StorageUnavailable
from files import make_temp_file, remove_quietly
from kinds import content_type, sniff_kind
from names import TEMP_PREFIX, name_problem, parse_derivative
from progress import Progress
from storages.disk import DiskStorage
from storages.s3 import (SOURCE_ETAG, TRANSFER, S3Storage, checksum_metadata, made_from, make_client, object_checksum,
                         store_errors)

PART = TRANSFER.multipart_chunksize
COUNTS = ('copied', 'already there', 'failed', 'conflicts', 'skipped', 'thumbnails left out')
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class NotAFile(Exception):
    """A symbolic link or anything but a regular file: never followed or read."""


def open_regular(path):
    """`path` opened for reading without following a symbolic link (NotAFile for a link or a non-file)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)     # a FIFO must not block
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotAFile('it is a symbolic link (not followed)') from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotAFile('it is not a regular file')
    return os.fdopen(descriptor, 'rb')


def expected_etag(path):
    """The ETag an S3 store gives this file when uploaded with our transfer settings."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size < TRANSFER.multipart_threshold:
            return '"%s"' % hashlib.md5(f.read()).hexdigest()
        digests = [hashlib.md5(chunk).digest() for chunk in iter(lambda: f.read(PART), b'')]
    return '"%s-%d"' % (hashlib.md5(b''.join(digests)).hexdigest(), len(digests))


def is_checkable(etag):
    """True for ETags that are MD5-based (not for e.g. SSE-KMS encrypted objects)."""
    return re.fullmatch(r'"[0-9a-f]{32}(-[0-9]+)?"', etag or '') is not None


def folder_files(folder, config):
    """(relative parts, path) of every attachment file in an upstream-layout folder."""
    kinds = (config.ORIG_DIR, config.THUMB_DIR)
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(TEMP_PREFIX)]
        parts = os.path.relpath(top, folder).split(os.sep)
        if parts == ['.'] or parts[-1] not in kinds or len(parts) > 2:
            continue
        for name in sorted(files):
            if not name_problem(name) and all(not name_problem(p) for p in parts):
                yield [*parts, name], os.path.join(top, name)


def shown(text):
    """`text` safe to print: bytes that are not UTF-8 and unprintable characters as escapes."""
    decoded = os.fsencode(text).decode('utf-8', 'backslashreplace')
    return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode() for c in decoded)


def source_problem(relative, path):
    """Why a file found in the folder is not copied, or None: a name that is not UTF-8, a link, not a file."""
    try:
        relative.encode('utf-8')
    except UnicodeEncodeError:
        return 'its name is not UTF-8'
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return 'it is a symbolic link (not followed)'
    return None if stat.S_ISREG(mode) else 'it is not a regular file'


def thumbnail_owner(parts, config):
    """The relative parts of the original a derivative's cache name (a thumbnail, WebP, pyramid or IIIF answer)
    belongs to, or None."""
    derivative = parse_derivative(parts[-1])
    return derivative and [*parts[:-2], config.ORIG_DIR, derivative.source]


def folder_storage(config, folder):
    """The folder as disk storage (its checksums' catalogue and index)."""
    return DiskStorage(types.SimpleNamespace(**{**vars(config), 'BASE_DIR': folder}))


def to_s3(config, folder, dry_run, overwrite=False):
    """Upload every attachment of `folder` the bucket does not already hold, verified; originals first,
    so that each fresh thumbnail can record the ETag its original has in the bucket. An original's checksum
    goes with it, into its metadata and the bucket's index."""
    client = make_client(config)
    checksums = folder_storage(config, folder), S3Storage(config)   # an original's checksum: read, kept
    files = [(parts, path, os.lstat(path).st_size) for parts, path in
             sorted(folder_files(folder, config), key=lambda found: found[0][-2] == config.THUMB_DIR)]
    counts, in_bucket = dict.fromkeys(COUNTS, 0), {}
    progress = Progress(len(files), sys.stderr, 'files', sum(size for _, _, size in files))
    for parts, path, size in files:
        try:
            outcome, message = upload_one(client, config, folder, parts, in_bucket, dry_run, overwrite, checksums)
        except NotAFile as error:      # replaced by a link or a special file since the walk
            outcome, message = 'skipped', f'skipped {shown("/".join(parts))}: {error}'
        counts[outcome] += 1
        if message:
            progress.say(message)
        progress.advance(size)
    progress.close()
    return counts


def upload_one(client, config, folder, parts, in_bucket, dry_run, overwrite, checksums):
    """Copy one file into the bucket unless it is there; (the count it goes to, what to tell or None).
    `in_bucket` maps each original's relative path to its ETag in the bucket once it is there."""
    relative, path = '/'.join(parts), os.path.join(folder, *parts)
    problem = source_problem(relative, path)
    if problem:
        return 'skipped', f'skipped {shown(relative)}: {problem}'
    metadata, checksum = {}, None
    if parts[-2] == config.ORIG_DIR:
        checksum = checksums[0].recorded_checksum(parts)
        metadata = checksum_metadata(checksum) if checksum else {}
    if parts[-2] == config.THUMB_DIR:
        owner = thumbnail_owner(parts, config)
        source = owner and in_bucket.get('/'.join(owner))
        if not source or os.lstat(path).st_mtime_ns < os.lstat(os.path.join(folder, *owner)).st_mtime_ns:
            return 'thumbnails left out', None
        metadata = {SOURCE_ETAG: source}
    prefix = config.S3_PREFIX.strip('/')
    key = '/'.join([prefix, *parts] if prefix else parts)
    size, etag = os.lstat(path).st_size, expected_etag(path)
    head = object_head(client, config.S3_BUCKET, key)
    same = same_object(head, size, etag)
    if same and all(head.get('Metadata', {}).get(field) == value for field, value in metadata.items()
                    if field in (SOURCE_ETAG, 'sha256')):
        outcome = 'already there'
    elif head and not same and not overwrite:
        return 'conflicts', f'conflict: {shown(key)} in the bucket has other bytes than {shown(relative)}; ' \
                            'left as it is (--overwrite replaces it)'
    elif dry_run:
        outcome = 'copied'
    else:
        kind = content_type(path, parts[-1]) if parts[-2] == config.ORIG_DIR \
            else sniff_kind(path) or 'application/octet-stream'
        with open_regular(path) as source_file, store_errors():
            client.upload_fileobj(source_file, config.S3_BUCKET, key, Config=TRANSFER,
                                  ExtraArgs={'ContentType': kind, 'Metadata': metadata})
        head = object_head(client, config.S3_BUCKET, key)
        if not same_object(head, size, etag):
            return 'failed', f'verification failed: {shown(key)}'
        if checksum:
            checksums[1].keep_index(parts, checksum.sha256)
        outcome = 'copied'
    if parts[-2] == config.ORIG_DIR:
        in_bucket[relative] = head['ETag'] if head else etag
    return outcome, None


def object_head(client, bucket, key):
    """The object's metadata, or None when the bucket has no such object."""
    try:
        with store_errors():
            return client.head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None


def same_object(head, size, etag):
    """True when the object `head` describes has this size and (where the store says) this checksum."""
    if head is None or head['ContentLength'] != size:
        return False
    return head['ETag'] == etag if is_checkable(head['ETag']) else True


def bucket_objects(client, config):
    """(relative parts, key, size, etag, last modified) of every attachment object under the prefix."""
    prefix = config.S3_PREFIX.strip('/')
    start = prefix + '/' if prefix else ''
    with store_errors():
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=config.S3_BUCKET, Prefix=start):
            for item in page.get('Contents', []):
                parts = item['Key'][len(start):].split('/')
                if 2 <= len(parts) <= 3 and parts[-2] in (config.ORIG_DIR, config.THUMB_DIR) \
                        and not any(name_problem(p) for p in parts):
                    yield parts, item['Key'], item['Size'], item['ETag'], item['LastModified']


def nanoseconds(moment):
    """A timezone-aware datetime as nanoseconds since the epoch, exactly."""
    return (moment - EPOCH) // datetime.timedelta(microseconds=1) * 1000


def local_matches(target, size, etag):
    """True when `target` is a regular file (not a link) of this size and (where known) this checksum."""
    try:
        return not os.path.islink(target) and os.path.getsize(target) == size and \
            (not is_checkable(etag) or expected_etag(target) == etag)
    except (FileNotFoundError, NotAFile):
        return False


def from_s3(config, folder, dry_run):
    """Download every attachment object that `folder` does not already hold, verified; originals first,
    each dated by its object's LastModified, then the thumbnails fresh in the bucket, dated no older."""
    client, disk = make_client(config), folder_storage(config, folder)
    objects = sorted(bucket_objects(client, config), key=lambda found: found[0][-2] == config.THUMB_DIR)
    originals = {'/'.join(parts): {'ETag': etag, 'LastModified': modified}
                 for parts, _, _, etag, modified in objects if parts[-2] == config.ORIG_DIR}
    counts = dict.fromkeys(COUNTS, 0)
    progress = Progress(len(objects), sys.stderr, 'files', sum(size for _, _, size, _, _ in objects))
    for parts, key, size, etag, modified in objects:
        target = os.path.join(folder, *parts)
        mtime = nanoseconds(modified)
        if parts[-2] == config.THUMB_DIR:
            mtime = fresh_thumbnail_time(client, config, folder, parts, key, originals, dry_run)
        if mtime is None:
            counts['thumbnails left out'] += 1
        elif local_matches(target, size, etag):
            counts['already there'] += 1
        elif dry_run:
            counts['copied'] += 1
        else:
            verified = download_one(client, config, key, target, size, etag, mtime)
            counts['copied' if verified else 'failed'] += 1
            if not verified:
                progress.say(f'verification failed: {shown(key)}')
        if parts[-2] == config.ORIG_DIR and not dry_run and local_matches(target, size, etag):
            keep_checksum(client, config, disk, parts, key)
        progress.advance(size)
    progress.close()
    return counts


def keep_checksum(client, config, disk, parts, key):
    """Record on disk the checksum an original's object carries, unless the folder has it already."""
    checksum = object_checksum(object_head(client, config.S3_BUCKET, key))
    recorded = disk.recorded_checksum(parts)
    if checksum and (recorded is None or recorded.sha256 != checksum.sha256):
        disk.keep_checksum(parts, checksum)


def fresh_thumbnail_time(client, config, folder, parts, key, originals, dry_run):
    """The modification time (ns) that keeps a thumbnail fresh on disk, or None when it is stale in the
    bucket (or its original is not on disk): no older than its object, nor than its original's file."""
    owner = thumbnail_owner(parts, config)
    original = owner and originals.get('/'.join(owner))
    thumbnail = original and object_head(client, config.S3_BUCKET, key)
    if not thumbnail or not made_from(thumbnail, original):
        return None
    made = nanoseconds(thumbnail['LastModified'])
    try:
        return max(made, os.lstat(os.path.join(folder, *owner)).st_mtime_ns)
    except FileNotFoundError:       # its download failed, or (in a dry run) it was not made
        return made if dry_run else None


def download_one(client, config, key, target, size, etag, mtime):
    """Download one object next to `target`, and put it in place dated `mtime` only if verified."""
    temp, handle = make_temp_file(os.path.dirname(target))
    handle.close()
    try:
        with store_errors():
            client.download_file(config.S3_BUCKET, key, temp, Config=TRANSFER)
        verified = os.path.getsize(temp) == size and (not is_checkable(etag) or expected_etag(temp) == etag)
        if verified:
            with open(temp, 'rb') as done:
                os.fsync(done.fileno())
            os.utime(temp, ns=(mtime, mtime))
            os.replace(temp, target)
        return verified
    finally:
        remove_quietly(temp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('direction', choices=['to-s3', 'from-s3'])
    parser.add_argument('--folder', help='attachments folder (default: BASE_DIR)')
    parser.add_argument('--dry-run', action='store_true', help='say what would be copied, copy nothing')
    parser.add_argument('--overwrite', action='store_true',
                        help='to-s3: replace objects in the bucket whose bytes differ from the folder\'s files')
    args = parser.parse_args(argv)
    try:
        config = load_config()
        if not config.S3_BUCKET:
            raise ConfigError('setting S3_BUCKET must name the bucket to copy to or from')
    except ConfigError as error:
        sys.exit(f'migrate: {error}')
    folder = os.path.abspath(args.folder or config.BASE_DIR)
    try:
        counts = to_s3(config, folder, args.dry_run, args.overwrite) if args.direction == 'to-s3' \
            else from_s3(config, folder, args.dry_run)
    except StorageUnavailable as error:
        sys.exit(f'migrate: {error}; run it again when the store is back (it resumes)')
    verb = 'would copy' if args.dry_run else 'copied'
    print(', '.join([f"{verb} {counts['copied']}"] + [f'{name} {counts[name]}' for name in COUNTS[1:]]))
    return 1 if counts['failed'] or counts['conflicts'] else 0


if __name__ == '__main__':
    sys.exit(main())
