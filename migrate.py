"""Copy an attachments folder into an S3 bucket, or a bucket back into a folder.

    python migrate.py to-s3   [--folder DIR] [--dry-run]
    python migrate.py from-s3 [--folder DIR] [--dry-run]

The folder (default BASE_DIR) is in the upstream layout, with or without collection folders:
originals/ and thumbnails/ directly in it, or in <collection folder>/ below it. The bucket and
prefix come from the server's settings (S3_BUCKET, S3_PREFIX, S3_ENDPOINT_URL, ... in settings.py
or the environment); keys mirror the folder, as the server expects them.

It is resumable: a file whose copy already exists with the same size and checksum is skipped,
so an interrupted run can simply be started again. Every copy is verified after it is made: the
size, and the checksum the store computed (its ETag: the MD5 of the bytes, or of the MD5s of the
parts for a multipart upload) against one computed here. Nothing is written with --dry-run.
"""

import argparse
import hashlib
import os
import re
import sys
import time

import core
from s3storage import TRANSFER, make_client, store_errors

PART = TRANSFER.multipart_chunksize


def expected_etag(path):
    """The ETag an S3 store gives this file when uploaded with our transfer settings."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        if size < TRANSFER.multipart_threshold:
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
        dirs[:] = [d for d in dirs if not d.startswith(core.TEMP_PREFIX)]
        parts = os.path.relpath(top, folder).split(os.sep)
        if parts == ['.'] or parts[-1] not in kinds or len(parts) > 2:
            continue
        for name in sorted(files):
            if not core.name_problem(name) and all(not core.name_problem(p) for p in parts):
                yield [*parts, name], os.path.join(top, name)


class Progress:
    """A one-line progress bar on standard error."""

    def __init__(self, total_files, total_bytes):
        self.total_files, self.total_bytes = total_files, max(total_bytes, 1)
        self.files = self.bytes = 0
        self.started = time.time()

    def advance(self, size):
        self.files += 1
        self.bytes += size
        share = self.bytes / self.total_bytes
        rate = self.bytes / max(time.time() - self.started, 1e-6) / 1e6
        bar = '#' * int(30 * share)
        sys.stderr.write(f'\r[{bar:<30}] {self.files}/{self.total_files} files, '
                         f'{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, {rate:.1f} MB/s')
        sys.stderr.flush()

    def done(self):
        sys.stderr.write('\n')


def to_s3(config, folder, dry_run):
    """Upload every attachment of `folder` that the bucket does not already hold, verified."""
    client, prefix = make_client(config), config.S3_PREFIX.strip('/')
    files = list(folder_files(folder, config))
    counts = {'copied': 0, 'already there': 0, 'failed': 0}
    progress = Progress(len(files), sum(os.path.getsize(path) for _, path in files))
    for parts, path in files:
        key = '/'.join([prefix, *parts] if prefix else parts)
        size, etag = os.path.getsize(path), expected_etag(path)
        if same_object(client, config.S3_BUCKET, key, size, etag):
            counts['already there'] += 1
        elif dry_run:
            counts['copied'] += 1
        else:
            kind = core.content_type(path, parts[-1]) if parts[-2] == config.ORIG_DIR \
                else core.sniff_kind(path) or 'application/octet-stream'
            with store_errors():
                client.upload_file(path, config.S3_BUCKET, key, Config=TRANSFER,
                                   ExtraArgs={'ContentType': kind})
            verified = same_object(client, config.S3_BUCKET, key, size, etag)
            counts['copied' if verified else 'failed'] += 1
            if not verified:
                sys.stderr.write(f'\nverification failed: {key}\n')
        progress.advance(size)
    progress.done()
    return counts


def same_object(client, bucket, key, size, etag):
    """True when the bucket holds `key` with this size and (where the store says) this checksum."""
    try:
        with store_errors():
            head = client.head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    if head['ContentLength'] != size:
        return False
    return head['ETag'] == etag if is_checkable(head['ETag']) else True


def bucket_objects(client, config):
    """(relative parts, key, size, etag) of every attachment object under the prefix."""
    prefix = config.S3_PREFIX.strip('/')
    start = prefix + '/' if prefix else ''
    with store_errors():
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=config.S3_BUCKET, Prefix=start):
            for item in page.get('Contents', []):
                parts = item['Key'][len(start):].split('/')
                if 2 <= len(parts) <= 3 and parts[-2] in (config.ORIG_DIR, config.THUMB_DIR) \
                        and not any(core.name_problem(p) for p in parts):
                    yield parts, item['Key'], item['Size'], item['ETag']


def from_s3(config, folder, dry_run):
    """Download every attachment object that `folder` does not already hold, verified."""
    client = make_client(config)
    objects = list(bucket_objects(client, config))
    counts = {'copied': 0, 'already there': 0, 'failed': 0}
    progress = Progress(len(objects), sum(size for _, _, size, _ in objects))
    for parts, key, size, etag in objects:
        target = os.path.join(folder, *parts)
        if os.path.isfile(target) and os.path.getsize(target) == size and \
                (not is_checkable(etag) or expected_etag(target) == etag):
            counts['already there'] += 1
        elif dry_run:
            counts['copied'] += 1
        else:
            temp, handle = core.make_temp_file(os.path.dirname(target))
            handle.close()
            try:
                with store_errors():
                    client.download_file(config.S3_BUCKET, key, temp, Config=TRANSFER)
                verified = os.path.getsize(temp) == size and (not is_checkable(etag) or expected_etag(temp) == etag)
                if verified:
                    with open(temp, 'rb') as done:
                        os.fsync(done.fileno())
                    os.replace(temp, target)
                counts['copied' if verified else 'failed'] += 1
                if not verified:
                    sys.stderr.write(f'\nverification failed: {key}\n')
            finally:
                core.remove_quietly(temp)
        progress.advance(size)
    progress.done()
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('direction', choices=['to-s3', 'from-s3'])
    parser.add_argument('--folder', help='attachments folder (default: BASE_DIR)')
    parser.add_argument('--dry-run', action='store_true', help='say what would be copied, copy nothing')
    args = parser.parse_args(argv)
    try:
        config = core.load_config()
        if not config.S3_BUCKET:
            raise core.ConfigError('setting S3_BUCKET must name the bucket to copy to or from')
    except core.ConfigError as error:
        sys.exit(f'migrate: {error}')
    folder = os.path.abspath(args.folder or config.BASE_DIR)
    copy = to_s3 if args.direction == 'to-s3' else from_s3
    try:
        counts = copy(config, folder, args.dry_run)
    except core.StorageUnavailable as error:
        sys.exit(f'migrate: {error}; run it again when the store is back (it resumes)')
    verb = 'would copy' if args.dry_run else 'copied'
    print(f"{verb} {counts['copied']}, already there {counts['already there']}, failed {counts['failed']}")
    return 1 if counts['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
