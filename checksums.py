"""Checksums of originals: SHA-256 (what the preservation checks compare) and MD5 (what most of the field's tools
still exchange), computed as an upload streams in, kept with the original by its storage, and answered as
RFC 9530's Repr-Digest. A checksum says whether it was taken at ingest or recorded later, of a file already
stored (by `preservation.py record`)."""

import base64
import hashlib
import json
import re
import time
import typing

from files import CHUNK

INGEST, LATER = 'ingest', 'later'          # when a checksum was taken: as the upload arrived, or of the stored file

SHA256 = re.compile(r'[0-9a-f]{64}')
MD5 = re.compile(r'[0-9a-f]{32}')


class Checksum(typing.NamedTuple):
    """What is recorded of one version of an original."""
    sha256: str                  # lowercase hex
    md5: str                     # lowercase hex
    size: int                    # bytes
    recorded: str                # INGEST or LATER
    at: float                    # when it was recorded, epoch seconds

    def as_text(self, previous: 'Checksum | None' = None) -> str:
        """A catalogue entry: this checksum, and the one of the version it replaces when given."""
        fields = self._asdict()
        if previous:
            fields['previous'] = previous._asdict()
        return json.dumps(fields, sort_keys=True)

    def repr_digest(self) -> str:
        """The Repr-Digest header's value (RFC 9530): the SHA-256 as a structured-field byte sequence."""
        return 'sha-256=:' + base64.b64encode(bytes.fromhex(self.sha256)).decode('ascii') + ':'


def checksum_from_text(text: str | bytes, previous: bool = False) -> Checksum | None:
    """The checksum a catalogue entry holds (`previous`: the one of the version it replaced), or None when it holds
    none (damaged, foreign, or no previous)."""
    try:
        fields = json.loads(text)
        return checksum_from_fields(fields['previous'] if previous else fields)
    except (ValueError, TypeError, KeyError):
        return None


def checksum_from_fields(fields: typing.Mapping) -> Checksum | None:
    """The checksum these fields (as_text's, or an object's metadata) hold, or None when they hold none."""
    try:
        found = Checksum(str(fields['sha256']), str(fields['md5']), int(fields['size']), str(fields['recorded']),
                         float(fields['at']))
    except (ValueError, TypeError, KeyError):
        return None
    valid = SHA256.fullmatch(found.sha256) and MD5.fullmatch(found.md5) and found.size >= 0 \
        and found.recorded in (INGEST, LATER)
    return found if valid else None


class Hashing:
    """Both digests of bytes fed in order, and their count."""

    def __init__(self) -> None:
        self.sha256, self.md5, self.size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)

    def checksum(self, recorded: str = INGEST) -> Checksum:
        return Checksum(self.sha256.hexdigest(), self.md5.hexdigest(), self.size, recorded, time.time())


def checksum_of_file(handle: typing.BinaryIO, recorded: str = LATER) -> Checksum:
    """The checksum of an open file's bytes from its current position to its end."""
    hashing = Hashing()
    for chunk in iter(lambda: handle.read(CHUNK), b''):
        hashing.update(chunk)
    return hashing.checksum(recorded)
