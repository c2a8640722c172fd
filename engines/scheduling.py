"""When conversions run: at most THUMBNAIL_WORKERS at once, interactive work (a client waits) ahead of
background work (pregeneration, browsers' WebPs), a bounded number of requests waiting, and the failures of
recent conversions remembered so that a corrupt original costs one attempt, not one per request.

Shared by every engine (ImageMagick and Ghostscript thumbnails, libvips pyramids and IIIF answers).
"""

import contextlib
import logging
import queue
import threading
import types
import typing

import cachetools

from errors import PassingFailure, StorageUnavailable, ThumbnailError, ThumbnailsBusy, UnknownCollection
from names import Identity

log = logging.getLogger('web_asset_server')

INTERACTIVE, BACKGROUND = 'interactive', 'background'
BACKLOG = 1000                   # Background jobs queued at once; more are dropped (they are made when asked for).
KEYED_JOBS_QUEUED = 500          # Background jobs asked for by views (browsers' WebPs) queued at once: half BACKLOG.
EVERY_SCALE = None               # What a failure of the file itself (its kind, header or page) is remembered for.
PYRAMID = 'pyramid'              # What a pyramid's failure is remembered for (a thumbnail's: its scale).


class Admission:
    """At most `most` interactive requests from asking for a conversion to its end; more get ThumbnailsBusy at once.

    This bounds the threads that wait for conversions (for a slot, or for another request's
    conversion of the same thumbnail), so the rest of THREADS keep serving every other request.
    """

    def __init__(self, most: int) -> None:
        self.most, self.now, self.lock = most, 0, threading.Lock()

    @contextlib.contextmanager
    def __call__(self, work: str) -> typing.Iterator[None]:
        if work == BACKGROUND:          # bounded by its own backlog
            yield
            return
        with self.lock:
            if self.now >= self.most:
                raise ThumbnailsBusy()
            self.now += 1
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1


class ConversionSlots:
    """THUMBNAIL_WORKERS conversion slots, shared by two classes of work.

    Interactive work (a client waits) waits at most `wait` seconds and goes ahead of background
    work; background work waits as long as it must and never holds every slot (unless there is
    only one).
    """

    def __init__(self, workers: int, wait: float) -> None:
        self.workers, self.wait = workers, wait
        self.background_share = max(1, workers - 1)
        self.condition = threading.Condition()
        self.running = {INTERACTIVE: 0, BACKGROUND: 0}
        self.waiting = {INTERACTIVE: 0, BACKGROUND: 0}

    @contextlib.contextmanager
    def __call__(self, work: str) -> typing.Iterator[None]:
        """Hold a conversion slot; ThumbnailsBusy when interactive work waited THUMBNAIL_QUEUE_WAIT in vain."""
        with self.condition:
            self.waiting[work] += 1
            try:
                if not self.condition.wait_for(lambda: self._may_start(work),
                                               self.wait if work == INTERACTIVE else None):
                    raise ThumbnailsBusy()
            finally:
                self.waiting[work] -= 1
            self.running[work] += 1
        try:
            yield
        finally:
            with self.condition:
                self.running[work] -= 1
                self.condition.notify_all()

    def _may_start(self, work: str) -> bool:
        free = self.workers - sum(self.running.values())
        if work == INTERACTIVE:
            return free > 0
        return free > 0 and not self.waiting[INTERACTIVE] and self.running[BACKGROUND] < self.background_share


class FailureMemory:
    """The reasons of recent failed conversions by (original's Identity, what), the oldest forgotten first.

    `what` is a thumbnail's scale, PYRAMID, or EVERY_SCALE for a failure of the file itself (its kind, header
    or page). An upload or delete here forgets the original's failures; a change by another server sharing the
    bucket changes the identity.
    """

    def __init__(self, entries: int) -> None:
        self.reasons, self.lock = cachetools.LRUCache(entries), threading.Lock()

    def reason(self, identity: Identity, scale: int | str | None) -> str | None:
        with self.lock:
            return self.reasons.get((identity, EVERY_SCALE)) or self.reasons.get((identity, scale))

    def remember(self, identity: Identity, scale: int | str | None, reason: str) -> None:
        with self.lock:
            self.reasons[(identity, scale)] = reason

    def forget(self, parts: tuple) -> None:
        """Forget the failures of the original at these path parts (it was replaced or deleted)."""
        with self.lock:
            for key in [key for key in self.reasons if key[0].parts == parts]:
                del self.reasons[key]


class Scheduler:
    """The admission, slots, remembered failures and background backlog that every conversion goes through."""

    def __init__(self, config: types.SimpleNamespace, admitted_at_once: int) -> None:
        self.admission = Admission(admitted_at_once)
        self.queue_wait = config.THUMBNAIL_QUEUE_WAIT
        self.slots = ConversionSlots(config.THUMBNAIL_WORKERS, self.queue_wait)
        self.failures = FailureMemory(config.THUMBNAIL_FAILURES_REMEMBERED)
        self.backlog = queue.Queue(maxsize=BACKLOG)
        self.queued_keys, self.queued_lock = set(), threading.Lock()
        self.background = None

    def admitted(self, work: str) -> typing.ContextManager[None]:
        """Held by a request from before it waits for another's conversion of the same derivative to its end."""
        return self.admission(work)

    def turn_wait(self, work: str) -> float | None:
        """Seconds `work` may wait for another's conversion of the same derivative (which may itself be background
        work waiting for a slot); None: as long as it takes."""
        return None if work == BACKGROUND else self.queue_wait

    def raise_remembered_failure(self, identity: Identity | None, what: int | str | None) -> None:
        """ThumbnailError with the reason of an earlier failure of these bytes for `what` (a scale, or a
        derivative kind), if any."""
        reason = identity is not None and self.failures.reason(identity, what)
        if reason:
            raise ThumbnailError(reason)

    def remembering(self, identity: Identity | None, what: int | str | None, step: typing.Callable) -> typing.Any:
        """Run one step of a conversion; remember its failure (unless it may pass next time)."""
        try:
            return step()
        except PassingFailure:
            raise
        except ThumbnailError as error:
            if identity is not None:
                self.failures.remember(identity, what, str(error))
            raise

    def in_background(self, job: typing.Callable[[], object], key: typing.Hashable | None = None) -> None:
        """Queue job() as background work; never waits, drops it when BACKLOG wait. A job with a `key` (a
        browser's WebP) is queued once until it has run, and such jobs take at most KEYED_JOBS_QUEUED, so that
        views never crowd out the pregeneration of uploads."""
        with self.queued_lock:
            if self.background is None:
                self.background = threading.Thread(target=self._work_backlog, daemon=True,
                                                   name='thumbnail-pregeneration')
                self.background.start()
            if key is not None and (key in self.queued_keys or len(self.queued_keys) >= KEYED_JOBS_QUEUED):
                return
            try:
                self.backlog.put_nowait((key, job))
            except queue.Full:
                return
            if key is not None:
                self.queued_keys.add(key)

    def _work_backlog(self) -> None:
        """Work the backlog for the server's lifetime: a job's failure is that job's, never the worker's end."""
        while True:
            key, job = self.backlog.get()
            try:
                job()
                job = None               # not kept while the worker waits: it may hold a storage's connections
            except (ThumbnailError, ThumbnailsBusy, StorageUnavailable, UnknownCollection, OSError):
                pass
            except Exception:
                log.exception('pregeneration failed')
            finally:
                with self.queued_lock:
                    self.queued_keys.discard(key)
