"""The failures that cross layers: raised by storages and engines, answered by the app (server.py), which alone
knows HTTP. Each message is safe to show a client."""


class ThumbnailError(Exception):
    """A derivative (thumbnail, pyramid, IIIF answer) that cannot be made of this file; answered 404."""


class PassingFailure(ThumbnailError):
    """A tool could not start, or was killed by another (the kernel's out-of-memory killer): worth trying again."""


class ThumbnailsBusy(Exception):
    """Too many conversions are running or waiting to take this one now; answered 503 with Retry-After."""


class StorageUnavailable(Exception):
    """The storage cannot be reached or failed; answered 503 with Retry-After."""


class ObjectChanged(StorageUnavailable):
    """The object was replaced or removed between requests that had to see one version of it."""


class UnknownCollection(LookupError):
    """A collection COLLECTION_DIRS does not name; answered 404."""


class MetadataBusy(Exception):
    """Every metadata reader stayed busy; answered 503, the client asked to wait `retry_after` seconds."""

    def __init__(self, retry_after):
        super().__init__('The server is busy reading metadata; try again shortly.')
        self.retry_after = retry_after


class Refused(Exception):
    """A request the app must refuse with this status and short reason (raised below the app, which knows HTTP)."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason
