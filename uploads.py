"""Uploads: a multipart/form-data body parsed as it streams in, its one file part staged in a temporary file
(synced before the app moves it into place) and its checksum taken as it arrives, its text fields decoded by
the charset each declares. What is wrong with an upload is a Refused with the status to answer; nothing is
staged after a refusal."""

import os
import re

import multipart

from checksums import Hashing
from errors import Refused
from files import CHUNK, NO_SPACE, make_temp_file, remove_quietly

MAX_FIELD_SIZE = 64 * 1024       # Largest text field of an upload.


class ClientGone(Exception):
    """The client stopped sending before the upload was complete."""


class Upload:
    """A multipart upload as received: its text fields and its one file part, staged on disk, with the
    part's checksum."""

    def __init__(self):
        self.fields = {}
        self.staged = None
        self.checksum = None

    def discard(self):
        """Remove the staged file unless it was moved into place."""
        if self.staged:
            remove_quietly(self.staged)
            self.staged = None


def decoded(data, charset):
    """A text part's bytes read by the charset it declares (Specify 6 sends ISO-8859-1); 400 for one unknown,
    not a text encoding (hex), or one that fails even with 'replace' (idna)."""
    try:
        return data.decode(charset, 'replace')
    except (LookupError, ValueError):
        raise Refused(400, 'A text part of the upload declares a charset this server cannot read.')


def receive_upload(environ, staging_folder, max_size):
    """Parse a multipart body as it streams in; the file part goes to a temporary file."""
    ctype, options = multipart.parse_options_header(environ.get('CONTENT_TYPE', ''))
    if ctype != 'multipart/form-data' or not options.get('boundary'):
        raise Refused(400, 'An upload must be multipart/form-data.')
    length = environ.get('CONTENT_LENGTH') or ''
    if not re.fullmatch(r'[0-9]+', length):
        raise Refused(411, 'An upload needs a Content-Length.')
    if int(length) > max_size:
        raise Refused(413, f'The upload is larger than this server accepts ({max_size} bytes).')
    stream = environ['wsgi.input']

    def read(size):
        try:
            return stream.read(size)
        except TimeoutError:
            raise Refused(408, 'The upload arrived too slowly.')
        except OSError as error:
            raise ClientGone() from error

    upload, sink, field = Upload(), None, None
    parser = multipart.PushMultipartParser(options['boundary'], int(length), max_header_count=16,
                                           max_segment_count=100)
    try:
        try:                 # closing flushes what is buffered, which a full disk refuses
            with parser:
                for event in parser.parse_blocking(read, CHUNK):
                    if isinstance(event, multipart.MultipartSegment):
                        if event.filename is not None:
                            if upload.staged:
                                raise Refused(400, 'An upload carries one file only.')
                            upload.staged, sink = make_temp_file(staging_folder)
                            hashing = Hashing()
                        else:
                            field, charset, sink = event.name, event.charset or 'utf-8', bytearray()
                    elif event and isinstance(sink, bytearray):
                        if len(sink) + len(event) > MAX_FIELD_SIZE:
                            raise Refused(400, f'The field {field!r} is too long.')
                        sink.extend(event)
                    elif event:
                        sink.write(event)
                        hashing.update(event)
                    elif isinstance(sink, bytearray):
                        upload.fields.setdefault(field, decoded(sink, charset))
                    else:
                        sink.flush()
                        os.fsync(sink.fileno())
                        sink.close()
                        upload.checksum = hashing.checksum()
        finally:
            if sink is not None and not isinstance(sink, bytearray):
                sink.close()
        return upload
    except (multipart.MultipartError, ClientGone):
        upload.discard()
        raise Refused(400, 'The upload is malformed or incomplete.')
    except OSError as error:
        upload.discard()
        if error.errno in NO_SPACE:
            raise Refused(507, 'The server has no room to store this file.')
        raise
    except BaseException:
        upload.discard()
        raise
