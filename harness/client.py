"""The app in-process, spoken to as Specify does (WebTest): tokens, uploads, fileget, delete; and multipart
bodies for requests to a real server."""

import os
import secrets

import webtest

import server
from names import RECORD_FOLDERS, TEMP_PREFIX, TRASH_DIR
from tokens import make_token


KEY = 'test-attachment-key'


class Client:
    """A WebTest client that speaks the protocol as Specify does."""

    def __init__(self, config):
        self.config = config
        self.app = server.create_app(config)
        self.web = webtest.TestApp(self.app)
        self.unlinted = webtest.TestApp(self.app, lint=False)    # for requests no valid WSGI server would pass on
        self.base = config.BASE_DIR

    def token(self, name, timestamp=None):
        return make_token(KEY, name, timestamp)

    def upload(self, store, data, coll='Fish', style=7, token=None, kind='O', status=None, **extra):
        """POST /fileupload like Specify 7 (file part first, named `file`) or 6 (fields first)."""
        token = self.token(store) if token is None else token
        fields = [('store', store), ('type', kind), ('coll', coll), ('token', token)]
        if style == 7:
            parts = [('file', 'blob', data)] + fields
        else:
            fields += [('disp', 'Fishes'), ('div', 'Zoology'), ('inst', 'Museum')]
            parts = fields + [('photo.jpg', 'photo.jpg', data)]
        content_type, body = multipart_body(parts)
        return self.post_raw('/fileupload', content_type, body, status=status, **extra)

    def post_raw(self, path, content_type, body=b'', status=None, **extra):
        """POST exactly these bytes (WebTest would otherwise re-encode a multipart body)."""
        if 'extra_environ' in extra:          # the test supplies its own wsgi.input
            extra['environ'] = extra.pop('extra_environ')
        else:
            extra['body'] = body
        return expect(status, self.web.request(path, method='POST', content_type=content_type,
                                               expect_errors=status is not None, **extra))

    def get(self, path, params, status=None, headers=None):
        return expect(status, self.web.get(path, params, expect_errors=status is not None, headers=headers or {}))

    def fileget(self, filename, kind='O', status=None, headers=None, **params):
        params = {'filename': filename, 'type': kind, 'coll': 'Fish', **params}
        return self.get('/fileget', params, status, headers)

    def delete(self, filename, coll='Fish', token=None, status=None):
        token = self.token(filename) if token is None else token
        return expect(status, self.web.post('/filedelete', {'filename': filename, 'coll': coll, 'token': token,
                                                            'disp': 'Fishes', 'div': 'Zoology', 'inst': 'Museum'},
                                            expect_errors=status is not None))

    def path(self, *parts):
        return os.path.join(self.base, *parts)

    def all_files(self):
        """Every stored file (and any left in BASE_DIR), relative to the storage's root; not the key file or the audit
        log, and not the server's records (checksums and their index, each of which must name a stored original;
        the trash, whose entries each have their bytes and their record)."""
        files = self.stored_files()
        records = {path for path in files if set(path.split('/')) & set(RECORD_FOLDERS)}
        for record in records:
            parts = record.split('/')
            at = next(i for i, part in enumerate(parts) if part in RECORD_FOLDERS)
            if parts[at] == TRASH_DIR:
                pair = record[:-len('.json')] if record.endswith('.json') else record + '.json'
                assert pair in files, f'{record} is half of a trash entry: {pair} is missing'
                continue
            original = '/'.join([*parts[:at], self.config.ORIG_DIR, parts[-1]])
            assert original in files, f'{record} is a record of {original}, which is not stored'
        return files - records

    def trash_entries(self):
        """The names of the originals in the trash, as stored (one per entry)."""
        return sorted(entry.name for coll in self.app.storage.every_collection()
                      for entry in self.app.storage.trashed(coll))

    def stored_files(self):
        """Every stored file (and any left in BASE_DIR), records included; not the key file or the audit log."""
        found = set()
        for folder, _dirs, files in os.walk(self.base):
            for name in files:
                found.add(os.path.relpath(os.path.join(folder, name), self.base))
        found.discard('.web-asset-server.key')
        found.discard(os.path.relpath(self.config.AUDIT_LOG, self.base))
        if self.config.STORAGE == 's3':
            storage = self.app.storage
            listing = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix + '/')
            found.update(item['Key'][len(storage.prefix) + 1:] for item in listing.get('Contents', []))
        return found

    def stored(self, relative):
        """The bytes stored at a path relative to the storage's root."""
        if self.config.STORAGE == 's3':
            storage = self.app.storage
            return storage.client.get_object(Bucket=storage.bucket, Key=f'{storage.prefix}/{relative}')['Body'].read()
        with open(self.path(relative), 'rb') as f:
            return f.read()

    def leftovers(self):
        """Temporary files or folders of the server's left under BASE_DIR."""
        return [os.path.join(folder, name) for folder, dirs, files in os.walk(self.base)
                for name in dirs + files if name.startswith(TEMP_PREFIX)]


def expect(status, answer):
    """The answer, once its status is the one expected ('*': any); WebTest checks none when errors are expected."""
    if status not in (None, '*'):
        assert answer.status_int == status, f'answered {answer.status}, not {status}: {answer.text[:300]}'
    return answer


def multipart_body(parts, boundary=None):
    """multipart/form-data in the given order: (name, value) fields, (name, filename, bytes) files."""
    boundary = boundary or 'specify' + secrets.token_hex(8)
    chunks = []
    for part in parts:
        if len(part) == 2:
            head = f'Content-Disposition: form-data; name="{part[0]}"'
            data = part[1].encode('utf-8')
        else:
            head = (f'Content-Disposition: form-data; name="{part[0]}"; filename="{part[1]}"\r\n'
                    'Content-Type: application/octet-stream')
            data = part[2]
        chunks.append(f'--{boundary}\r\n{head}\r\n\r\n'.encode('utf-8') + data + b'\r\n')
    chunks.append(f'--{boundary}--\r\n'.encode())
    return f'multipart/form-data; boundary={boundary}', b''.join(chunks)
