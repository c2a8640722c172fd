"""S3-compatible object storage for the Web Asset Server (STORAGE = 's3').

Keys mirror the disk layout below S3_PREFIX: [<collection folder>/]originals/<name> and
[<collection folder>/]thumbnails/<root>_<scale><ext>, so several servers can share one bucket
and an attachments folder can be copied in as it is (see migrate.py). Nothing is held whole in
memory: uploads go up from the staged file (multipart when large), downloads stream, and EXIF is
read through ranged GETs. Every answer's ETag, length and bytes come from one version of an
object: a plain GET is answered from that GET's own metadata, and every other GET is pinned with
If-Match to the ETag of the HEAD that described it. A store that cannot be reached raises
StorageUnavailable, as does an object that keeps changing while it is read.
"""

import collections
import contextlib
import functools
import io
import logging
import os
import threading
import time

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from checksums import SHA256, checksum_from_fields
from errors import ObjectChanged, StorageUnavailable
from files import CHUNK, SeekableReader, make_temp_file, remove_quietly
from kinds import content_type, sniff_kind
from names import INDEX_DIR, Identity, derivative_source, name_problem, parse_derivative
from storages.base import TRASH_ID, Found, Storage, Trashed, new_trash_id, trashed_from_text

log = logging.getLogger('web_asset_server')
MiB = 1024 ** 2
TRANSFER = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB,
                          max_concurrency=4)   # at most 64 MiB in flight per transfer
SOURCE_ETAG = 'source-etag'     # a thumbnail's user metadata: the ETag of the original it was made from


SESSIONS = {}                   # (access key, secret, region) -> the boto3 session clients are made from
SESSIONS_LOCK = threading.Lock()


def make_client(config):
    """A boto3 S3 client with the timeouts and addressing the settings ask for. Clients of the same credentials
    come from one session, which loads botocore's service model once (a new session takes 0.2 to 0.4 s a client);
    a session is not thread-safe, its clients are."""
    credentials = (config.S3_ACCESS_KEY_ID, config.S3_SECRET_ACCESS_KEY, config.S3_REGION)
    with SESSIONS_LOCK:
        if credentials not in SESSIONS:
            SESSIONS[credentials] = boto3.session.Session(aws_access_key_id=credentials[0],
                                                          aws_secret_access_key=credentials[1],
                                                          region_name=credentials[2])
        return SESSIONS[credentials].client('s3', endpoint_url=config.S3_ENDPOINT_URL, config=Config(
            s3={'addressing_style': config.S3_ADDRESSING_STYLE},
            connect_timeout=config.S3_CONNECT_TIMEOUT, read_timeout=config.S3_READ_TIMEOUT,
            retries={'max_attempts': 2, 'mode': 'standard'},
            max_pool_connections=config.THREADS + 8,
            request_checksum_calculation='when_required',      # S3-compatible stores vary in checksum support
            response_checksum_validation='when_required'))


@contextlib.contextmanager
def store_errors():
    """Missing objects become FileNotFoundError, a failed If-Match ObjectChanged; the rest StorageUnavailable."""
    try:
        yield
    except ClientError as error:
        code = str(error.response.get('Error', {}).get('Code', ''))
        status = error.response.get('ResponseMetadata', {}).get('HTTPStatusCode')
        if status == 404 and code != 'NoSuchBucket' or code in ('NoSuchKey', 'NotFound'):
            raise FileNotFoundError(code) from None
        if status == 412 or code == 'PreconditionFailed':
            raise ObjectChanged('the file changed while it was read; try again') from None
        log.warning('object store error: %s', error)
        raise StorageUnavailable(f'the object store answered {code or status}') from None
    except BotoCoreError as error:
        log.warning('object store unreachable: %s', error)
        raise StorageUnavailable('the object store cannot be reached') from None
    except (S3UploadFailedError, S3TransferFailedError) as error:     # boto3's transfers wrap the store's errors
        log.warning('object store transfer failed: %s', error)
        raise StorageUnavailable('the object store failed a transfer') from None


class LocalCopies:
    """Local copies of stored objects by (key, ETag), at most `most` kept, the least recently used removed first
    once no request holds it; named as temporaries, so a crash leaves nothing the next start does not sweep."""

    def __init__(self, folder, most):
        self.folder, self.most = folder, most
        self.kept, self.lock = collections.OrderedDict(), threading.Lock()     # (key, etag) -> [path, holders]

    @contextlib.contextmanager
    def held(self, version, download):
        """The local path of `version`, made by download(path) the first time; kept while held."""
        with self.lock:
            entry = self.kept.get(version)
            if entry:
                entry[1] += 1
                self.kept.move_to_end(version)
        if entry is None:
            fetched = self._fetched(download)
            with self.lock:
                entry = self.kept.setdefault(version, [fetched, 0])      # another request may have fetched it too
                entry[1] += 1
                self.kept.move_to_end(version)
            if entry[0] != fetched:
                remove_quietly(fetched)
        try:
            yield entry[0]
        finally:
            with self.lock:
                entry[1] -= 1
                self._evict()

    def _fetched(self, download):
        local, handle = make_temp_file(self.folder)
        handle.close()
        try:
            download(local)
        except BaseException:
            remove_quietly(local)
            raise
        return local

    def _evict(self):
        """Remove the least recently used copies beyond `most` that nobody holds (under the lock)."""
        for version in list(self.kept):
            if len(self.kept) <= self.most:
                return
            path, holders = self.kept[version]
            if not holders:
                del self.kept[version]
                remove_quietly(path)


def checksum_metadata(checksum):
    """An original's checksum as object metadata (x-amz-meta-*): stored with the object, in the same PUT."""
    return {'sha256': checksum.sha256, 'md5': checksum.md5, 'checksum-recorded': checksum.recorded,
            'checksum-at': repr(checksum.at)}


def object_checksum(described):
    """The checksum in a HEAD's or GET's metadata, for the object's size; None when there is none."""
    if not described:
        return None
    metadata = described.get('Metadata') or {}
    return checksum_from_fields({'sha256': metadata.get('sha256'), 'md5': metadata.get('md5'),
                                 'size': described.get('ContentLength'), 'recorded': metadata.get('checksum-recorded'),
                                 'at': metadata.get('checksum-at')})


class S3Storage(Storage):
    """Attachments as objects in one bucket, in the upstream layout below S3_PREFIX."""
    local_pyramids = 8          # local copies of pyramids kept for cutting IIIF answers

    def __init__(self, config):
        super().__init__(config)
        self.bucket = config.S3_BUCKET
        self.prefix = config.S3_PREFIX.strip('/')
        self.client = make_client(config)
        self.local_copies = LocalCopies(self.staging_folder(), self.local_pyramids)

    def key(self, parts):
        return '/'.join([self.prefix, *parts] if self.prefix else parts)

    def head(self, key):
        """The object's metadata, or None when there is no such object."""
        try:
            with store_errors():
                return self.client.head_object(Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return None

    def health(self):
        try:
            with store_errors():
                self.client.head_bucket(Bucket=self.bucket)
            return 'ok'
        except (StorageUnavailable, FileNotFoundError):
            return 'unreachable'

    def exists(self, coll, name):
        return self.head(self.key(self.original_parts(coll, name))) is not None

    def save(self, coll, name, staged, checksum):
        """Upload a complete staged file with its checksum in its metadata (a PUT is all or nothing), its index
        entry first; then drop the old bytes' derivatives and index entry."""
        key = self.key(self.original_parts(coll, name))
        head = self.head(key)
        old = object_checksum(head)
        self._index(coll, checksum.sha256, name)
        with store_errors():
            self.client.upload_file(staged, self.bucket, key, Config=TRANSFER, ExtraArgs={
                'ContentType': content_type(staged, name), 'Metadata': checksum_metadata(checksum)})
        remove_quietly(staged)
        if old and old.sha256 != checksum.sha256:
            self._unindex(coll, old.sha256, name)
        self._delete_derivatives(coll, name)
        return head is not None

    def delete(self, coll, name):
        """Remove an original, its index entry and exactly its own derivatives; False when it is not there."""
        key = self.key(self.original_parts(coll, name))
        head = self.head(key)
        if head is None:
            return False
        with store_errors():
            self.client.delete_object(Bucket=self.bucket, Key=key)
        old = object_checksum(head)
        if old:
            self._unindex(coll, old.sha256, name)
        self._delete_derivatives(coll, name)
        return True

    # --- The trash: a prefix beside the originals (docs/preservation.md says why not bucket versioning) ------

    def trash(self, coll, name):
        """The record first, then the object copied into the trash (its metadata with it) and removed."""
        key = self.key(self.original_parts(coll, name))
        head = self.head(key)
        if head is None:
            return None
        checksum = object_checksum(head)
        now = time.time()
        entry = Trashed(new_trash_id(now), name, now, head['ContentLength'], checksum)
        trashed = self.key(self.trash_parts(coll, entry.id))
        with store_errors():
            self.client.put_object(Bucket=self.bucket, Key=trashed + '.json', Body=entry.as_text().encode('utf-8'))
            self.client.copy({'Bucket': self.bucket, 'Key': key}, self.bucket, trashed, Config=TRANSFER,
                             ExtraArgs={'Metadata': head.get('Metadata') or {}, 'MetadataDirective': 'REPLACE',
                                        'ContentType': head.get('ContentType') or 'application/octet-stream'})
            self.client.delete_object(Bucket=self.bucket, Key=key)
        if checksum:
            self._unindex(coll, checksum.sha256, name)
        self._delete_derivatives(coll, name)
        return entry

    def keys_under(self, parts):
        """The keys below a folder of the layout, relative to it, a page of the listing at a time."""
        folder = self.key(parts) + '/'
        with store_errors():
            for page in self.client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=folder):
                for item in page.get('Contents', []):
                    yield item['Key'][len(folder):]

    def trashed(self, coll):
        keys = set(self.keys_under(self.trash_parts(coll)))
        ids = [k for k in keys if TRASH_ID.fullmatch(k) and k + '.json' in keys]
        entries = (self._trashed(coll, entry_id) for entry_id in ids)
        yield from sorted((entry for entry in entries if entry), key=lambda entry: (entry.deleted, entry.id))

    def _trashed(self, coll, entry_id):
        try:
            with store_errors():
                key = self.key(self.trash_parts(coll, entry_id + '.json'))
                return trashed_from_text(entry_id, self.client.get_object(Bucket=self.bucket, Key=key)['Body'].read())
        except FileNotFoundError:
            return None

    def restore(self, coll, entry_id):
        """The object copied back with its checksum as recorded, then the trash entry removed."""
        entry = TRASH_ID.fullmatch(entry_id) and self._trashed(coll, entry_id)
        trashed = self.key(self.trash_parts(coll, entry_id))
        head = entry and self.head(trashed)
        if not head:
            raise FileNotFoundError(entry_id)
        key = self.key(self.original_parts(coll, entry.name))
        if self.head(key) is not None:
            raise FileExistsError(entry.name)
        if entry.checksum:
            self._index(coll, entry.checksum.sha256, entry.name)
        with store_errors():
            self.client.copy({'Bucket': self.bucket, 'Key': trashed}, self.bucket, key, Config=TRANSFER, ExtraArgs={
                'Metadata': checksum_metadata(entry.checksum) if entry.checksum else {},
                'MetadataDirective': 'REPLACE', 'ContentType': head.get('ContentType') or 'application/octet-stream'})
        self.purge(coll, entry_id)
        return entry

    def purge(self, coll, entry_id):
        if not TRASH_ID.fullmatch(entry_id):
            raise FileNotFoundError(entry_id)
        trashed = self.key(self.trash_parts(coll, entry_id))
        with store_errors():
            self.client.delete_object(Bucket=self.bucket, Key=trashed)
            self.client.delete_object(Bucket=self.bucket, Key=trashed + '.json')

    # --- Checksums: in each original's metadata, and the index ---------------------------------------------

    def checksum(self, coll, name):
        head = self.head(self.key(self.original_parts(coll, name)))
        if head is None:
            raise FileNotFoundError(name)
        return object_checksum(head)

    def record_checksum(self, coll, name, checksum, identity):
        """The object copied onto itself with the checksum in its metadata, only while it is the version
        `identity` (If-Match on its ETag)."""
        key = self.key(self.original_parts(coll, name))
        head = self.head(key)
        if head is None or head['ETag'] != identity.version[0]:
            return False
        self._index(coll, checksum.sha256, name)
        try:
            with store_errors():
                self.client.copy({'Bucket': self.bucket, 'Key': key}, self.bucket, key, Config=TRANSFER, ExtraArgs={
                    'Metadata': {**(head.get('Metadata') or {}), **checksum_metadata(checksum)},
                    'MetadataDirective': 'REPLACE', 'CopySourceIfMatch': head['ETag'],
                    'ContentType': head.get('ContentType') or 'application/octet-stream'})
        except (ObjectChanged, FileNotFoundError):
            return False
        old = object_checksum(head)
        if old and old.sha256 != checksum.sha256:
            self._unindex(coll, old.sha256, name)
        return True

    def keep_index(self, parts, sha256):
        """The index entry of the original at `parts`, whose checksum is in its metadata (migrate.py)."""
        with store_errors():
            self.client.put_object(Bucket=self.bucket, Key=self.key(self.index_parts_of(parts, sha256)), Body=b'')

    def _index(self, coll, sha256, name):
        with store_errors():
            self.client.put_object(Bucket=self.bucket, Key=self.key(self.index_parts(coll, sha256, name)), Body=b'')

    def _unindex(self, coll, sha256, name):
        with store_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self.key(self.index_parts(coll, sha256, name)))

    def catalogued(self, coll):
        found = {}
        for key in self.keys_under([*self.folder_parts(coll), INDEX_DIR]):
            sha256, _, name = key.partition('/')
            if SHA256.fullmatch(sha256) and not name_problem(name):
                found[name] = sha256
        return found

    def indexed(self, coll, sha256):
        return self.keys_under(self.index_parts(coll, sha256))

    def _delete_derivatives(self, coll, name):
        folder = self.key([*self.folder_parts(coll), self.thumb_dir]) + '/'
        prefix = folder + os.path.splitext(name)[0] + '_'
        owned = self.owns_derivative(coll, name)
        with store_errors():
            for page in self.client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get('Contents', []):
                    if owned(item['Key'][len(folder):]):
                        self.client.delete_object(Bucket=self.bucket, Key=item['Key'])

    def open(self, coll, name):
        """The original as a seekable file that fetches what is read (FileNotFoundError when missing)."""
        key = self.key(self.original_parts(coll, name))
        head = self.head(key)
        if head is None:
            raise FileNotFoundError(key)
        return io.BufferedReader(RangeReader(self, key, head['ContentLength'], head['ETag']), 64 * 1024)

    def local_original(self, coll, name):
        """A local copy of the original, removed after (FileNotFoundError when there is none)."""
        return self.local_copy(self.key(self.original_parts(coll, name)))

    @contextlib.contextmanager
    def local_copy(self, key):
        """A local copy of the object at `key`, removed after."""
        local, handle = make_temp_file(self.staging_folder())
        handle.close()
        try:
            with store_errors():
                self.client.download_file(self.bucket, key, local, Config=TRANSFER)
            yield local
        finally:
            remove_quietly(local)

    def get_version(self, key, etag, start, end, size):
        """Bytes start..end of the version `etag` of an object of `size` bytes; ObjectChanged once it is gone."""
        wanted = {} if (start, end) == (0, size) else {'Range': f'bytes={start}-{end - 1}'}
        try:
            with store_errors():
                return self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag, **wanted)['Body']
        except FileNotFoundError:
            raise ObjectChanged('the file was removed while it was read') from None

    def found(self, parts, whole=False, seen=None):
        """One version of the object: a `whole` answer from one GET's own body and metadata, anything else from a
        HEAD and GETs pinned to its ETag (ObjectChanged once that version is gone)."""
        key = self.key(parts)
        got = None
        if whole:
            with store_errors():
                got = self.client.get_object(Bucket=self.bucket, Key=key)
        described = got or self.head(key)
        if described is None:
            raise FileNotFoundError(key)
        size = described['ContentLength']

        def body(start, end):
            if got and (start, end) == (0, size):
                return stream(got['Body'])
            return stream(self.get_version(key, described['ETag'], start, end, size))
        checksum = object_checksum(described) if self.catalogue_parts(parts) else None
        return Found(size, described['ETag'], described['LastModified'].timestamp(),
                     described.get('ContentType') or None, body, got['Body'].close if got else lambda: None, checksum)

    def derivative_is_fresh(self, coll, name, cache_name, identity=None):
        """A stored derivative counts when it was made from the original's current bytes (`identity`, when known)."""
        derivative = self.head(self.key(self.derivative_parts(coll, cache_name)))
        if derivative and identity:
            return made_from(derivative, {'ETag': identity.version[0], 'LastModified': identity.version[1]})
        original = derivative and self.head(self.key(self.original_parts(coll, name)))
        return bool(original) and made_from(derivative, original)

    def original_identity(self, coll, name):
        """What names the original's current bytes (FileNotFoundError when there is none): its ETag and time."""
        head = self.head(self.key(self.original_parts(coll, name)))
        if head is None:
            raise FileNotFoundError(name)
        return Identity(tuple(self.original_parts(coll, name)), (head['ETag'], head['LastModified']))

    def store_derivative(self, coll, name, cache_name, made, identity):
        """Store a made derivative as made from the original's bytes `identity`; False (and removed again) when
        the original changed meanwhile."""
        key = self.key(self.derivative_parts(coll, cache_name))
        with store_errors():
            self.client.upload_file(made, self.bucket, key, Config=TRANSFER, ExtraArgs={
                'ContentType': sniff_kind(made) or 'application/octet-stream',
                'Metadata': {SOURCE_ETAG: identity.version[0]}})
        now = self.head(self.key(self.original_parts(coll, name)))
        if now is None or now['ETag'] != identity.version[0]:
            with store_errors():
                self.client.delete_object(Bucket=self.bucket, Key=key)
            return False
        return True

    @contextlib.contextmanager
    def local_derivative(self, coll, cache_name):
        """A local copy of a stored derivative (FileNotFoundError when there is none). A pyramid's is one of the
        few kept of the latest versions used, so the tiles cut from one pyramid fetch it once; any other's is
        removed after."""
        key = self.key(self.derivative_parts(coll, cache_name))
        parsed = parse_derivative(cache_name)
        if parsed is None or parsed.kind != 'pyramid':
            with self.local_copy(key) as path:
                yield path
            return
        head = self.head(key)
        if head is None:
            raise FileNotFoundError(key)
        with self.local_copies.held((key, head['ETag']), functools.partial(self._download_version, key)) as path:
            yield path

    def _download_version(self, key, local):
        """Download the object (transfers take no If-Match: a version replaced meanwhile is newer, never wrong)."""
        with store_errors():
            self.client.download_file(self.bucket, key, local, Config=TRANSFER)

    # --- Listing: what derivatives.py walks and the cache bound weighs -----------------------

    def originals_modified(self, coll):
        """(name, LastModified in epoch seconds) of each original, a page of the listing at a time."""
        for name, _size, modified in self._listed(coll, self.orig_dir):
            yield name, modified

    def originals_bytes(self, coll):
        """The bytes the collection's originals hold, a page of the listing at a time."""
        return sum(size for _name, size, _modified in self._listed(coll, self.orig_dir))

    def derivatives(self, coll):
        """(cache name, size in bytes, LastModified in epoch seconds) of each stored derivative, a page of the
        listing at a time."""
        for listed in self._listed(coll, self.thumb_dir):
            if derivative_source(listed[0]) is not None:
                yield listed

    def remove_derivative(self, coll, cache_name):
        if name_problem(cache_name) or derivative_source(cache_name) is None:
            raise ValueError(f'not a derivative cache name: {cache_name!r}')
        with store_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self.key(self.derivative_parts(coll, cache_name)))

    def stored_size(self, parts):
        head = self.head(self.key(parts))
        return head['ContentLength'] if head else 0

    def _listed(self, coll, folder):
        """(name, size, LastModified in epoch seconds) of the objects right in one of the collection's folders."""
        start = self.key([*self.folder_parts(coll), folder]) + '/'
        pages = self.client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=start)
        with store_errors():
            for page in pages:
                for item in page.get('Contents', []):
                    name = item['Key'][len(start):]
                    if not name_problem(name):
                        yield name, item['Size'], item['LastModified'].timestamp()


def made_from(thumbnail, original):
    """Whether a thumbnail was made from the original's current bytes (both as HEAD or a listing describes them)."""
    source = thumbnail.get('Metadata', {}).get(SOURCE_ETAG)
    return source == original['ETag'] if source else thumbnail['LastModified'] >= original['LastModified']


def stream(body):
    """Yield an object's body in chunks, closing the connection however the client stops."""
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


class RangeReader(SeekableReader):
    """A read-only, seekable object, fetched with ranged GETs pinned to one version as it is read."""

    def __init__(self, storage, key, size, etag):
        super().__init__(size)
        self.storage, self.key, self.etag = storage, key, etag

    def fetch(self, position, size):
        with self.storage.get_version(self.key, self.etag, position, position + size, self.size) as body:
            return body.read()
