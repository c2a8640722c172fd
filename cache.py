"""The derivative cache: every kind of derivative (thumbnail, WebP, preview, pyramid, IIIF answer) made once
across threads, fresh against its original, from the smallest fresh cached derivative large enough, and kept
within its bounds, on any storage and with any engine.

A derivative is made from a local copy of its source, in the scheduler's slots, and stored only if its original
is still the bytes it was made from (Identity); a request that finds another making the same derivative waits
for it within its turn. Other scales than the configured ones are bounded per original and in number of
originals (OtherScales); the whole cache by THUMBNAIL_CACHE_MAX_BYTES, kept by a sweep in the background.
"""

import collections
import contextlib
import functools
import heapq
import logging
import math
import threading
import time
import types
import typing

import cachetools

from engines.imagemagick import ImageMagick
from engines.scheduling import BACKGROUND, INTERACTIVE, PYRAMID, Scheduler
from engines.vips import Vips
from errors import ThumbnailError, ThumbnailsBusy
from files import KeyedLocks
from kinds import tiff_pages
from iiif import Plan
from names import Identity, parse_derivative, pyramid_name, thumbnail_name, tile_name
from storages.base import Coll, Storage

log = logging.getLogger('web_asset_server')


class DerivativeCache:
    """The policy for every derivative of one storage, made by the given engines."""

    def __init__(self, config: types.SimpleNamespace, storage: Storage, scheduler: Scheduler | None,
                 imagemagick: ImageMagick | None, vips: Vips | None) -> None:
        self.storage, self.scheduler, self.imagemagick, self.vips = storage, scheduler, imagemagick, vips
        self.locks = KeyedLocks()
        self.ladder = sorted(config.PREGENERATE_SCALES)      # configured scales, kept whatever else is removed
        self.other_scales = OtherScales(config.THUMBNAIL_OTHER_SCALES, config.THUMBNAIL_OTHER_SCALES_ORIGINALS)
        self.cache_size = any(config.THUMBNAIL_CACHE_BOUND) and CacheSize(*config.THUMBNAIL_CACHE_BOUND)
        self.view_sizes = ViewSizes(config.THUMBNAIL_FAILURES_REMEMBERED)

    @contextlib.contextmanager
    def one_at_a_time(self, coll: Coll, cache_name: str, work: str) -> typing.Iterator[None]:
        """Hold the lock of one derivative; ThumbnailsBusy when a client would wait for it longer than its turn."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.locks((coll, cache_name), self.scheduler.turn_wait(work)))
            except TimeoutError:
                raise ThumbnailsBusy() from None
            yield

    def original_changed(self, coll: Coll, name: str) -> None:
        """After an upload or delete of the original: its remembered failures no longer hold."""
        self.scheduler.failures.forget(tuple(self.storage.original_parts(coll, name)))

    # --- Thumbnails (previews are large thumbnails) ---------------------------------------------------------------

    def ensure_thumbnail(self, coll: Coll, name: str, scale: int, webp: bool = False,
                         work: str = INTERACTIVE) -> object:
        """Make the thumbnail of `name` at `scale` unless a fresh one is stored; one conversion at a time. What
        found one fresh at once (on disk its stat, which sending it need not take again), else None."""
        cache_name = thumbnail_name(name, scale, webp)
        if len(cache_name.encode('utf-8', 'surrogatepass')) > 255:
            raise ThumbnailError('The file name is too long to name its thumbnail.')
        fresh = self.storage.derivative_is_fresh(coll, name, cache_name)
        if fresh:
            return fresh
        with self.scheduler.admitted(work), self.one_at_a_time(coll, cache_name, work):   # others wait for it
            for _attempt in range(3):
                if self.storage.derivative_is_fresh(coll, name, cache_name):
                    return None
                if self.make_thumbnail(coll, name, scale, webp, work):
                    self.keep_within_bounds(coll, name, scale, webp)
                    return None
            raise ThumbnailError('The file kept changing while its thumbnail was made.')

    def ensure_answerable_thumbnail(self, coll: Coll, name: str, scale: int, webp: bool = False) -> tuple[object, bool]:
        """(what found it fresh, whether it is WebP) for a thumbnail request: a browser that accepts WebP gets the
        plain thumbnail while only that is cached (pregenerated ones are plain), its WebP made in the background,
        so that a first view needs no conversion; else as ensure_thumbnail."""
        if webp and not self.storage.derivative_is_fresh(coll, name, thumbnail_name(name, scale, True)):
            plain = self.storage.derivative_is_fresh(coll, name, thumbnail_name(name, scale))
            if plain:
                self.scheduler.in_background(
                    functools.partial(self.ensure_thumbnail, coll, name, scale, webp=True, work=BACKGROUND),
                    key=(coll, name, scale, True))
                return plain, False
        return self.ensure_thumbnail(coll, name, scale, webp), webp

    def make_thumbnail(self, coll: Coll, name: str, scale: int, webp: bool = False, work: str = INTERACTIVE) -> bool:
        """Convert the smallest fresh cached thumbnail larger than `scale` if there is one, else the original, and
        store the result; False if the original changed meanwhile. A failure is remembered only for the original
        itself: a cached source may just have gone."""
        try:
            identity = self.storage.original_identity(coll, name)
        except FileNotFoundError:
            raise ThumbnailError('No such file.') from None
        self.scheduler.raise_remembered_failure(identity, scale)
        cache_name = thumbnail_name(name, scale, webp)
        larger = self.larger_fresh_thumbnail(coll, name, scale, identity)
        if larger:
            try:
                with self.storage.local_derivative(coll, larger) as source:
                    return self._convert_and_store(source, coll, name, cache_name, scale, webp, None, identity, work)
            except (ThumbnailError, FileNotFoundError):
                pass
        try:
            with self.storage.local_original(coll, name) as source:
                return self._convert_and_store(source, coll, name, cache_name, scale, webp, identity, identity, work)
        except FileNotFoundError:
            raise ThumbnailError('No such file.') from None

    def _convert_and_store(self, source: str, coll: Coll, name: str, cache_name: str, scale: int, webp: bool,
                           remembered: Identity | None, identity: Identity, work: str) -> bool:
        folder = self.storage.scratch_folder(coll, cache_name)
        with self.imagemagick.converted(source, scale, folder, remembered, webp, work) as made:
            return self.storage.store_derivative(coll, name, cache_name, made, identity)

    def larger_fresh_thumbnail(self, coll: Coll, name: str, scale: int, identity: Identity) -> str | None:
        """The cache name of the smallest cached plain thumbnail larger than `scale` made from the original's current
        bytes, of a configured scale or one made on request, or None."""
        for larger in sorted({*self.ladder, *self.other_scales.scales_of((coll, name))}):
            cache_name = thumbnail_name(name, larger)
            if larger > scale and self.storage.derivative_is_fresh(coll, name, cache_name, identity):
                return cache_name
        return None

    def pregenerate(self, coll: Coll, name: str, scales: list[int]) -> None:
        """Queue the making of each of `scales` as background work, largest first, so that each smaller one is
        made from the one before."""
        def make_each() -> None:
            for scale in scales:
                self.ensure_thumbnail(coll, name, scale, work=BACKGROUND)
        self.scheduler.in_background(make_each)

    # --- IIIF: pyramids and the answers cut from them ------------------------------------------------------------

    def viewed(self, coll: Coll, name: str) -> tuple[Identity, tuple[int, int]]:
        """(identity, (width, height) as shown) of an original to view, its pyramid made if need be; FileNotFoundError
        for a missing original, ThumbnailError for one that is no viewable image (remembered, so a corrupt file is
        not tried again for every tile)."""
        identity = self.storage.original_identity(coll, name)
        self.scheduler.raise_remembered_failure(identity, PYRAMID)
        size = self.view_sizes.get(identity)
        if size is None:
            with self.scheduler.admitted(INTERACTIVE):
                self.ensure_pyramid(coll, name, identity)
                size = self.view_sizes.get(identity) or self.pyramid_size(coll, name, identity)
        return identity, size

    def ensure_pyramid(self, coll: Coll, name: str, identity: Identity) -> None:
        """Build and store the original's pyramid unless a fresh one is stored; one build at a time per original."""
        cache_name = pyramid_name(name)
        if len(cache_name.encode('utf-8', 'surrogatepass')) > 255:      # a valid name's can only be too long
            raise ThumbnailError('The file name is too long to name its pyramid.')
        if self.storage.derivative_is_fresh(coll, name, cache_name):
            return
        with self.one_at_a_time(coll, cache_name, INTERACTIVE):
            if self.storage.derivative_is_fresh(coll, name, cache_name):
                return
            with self.storage.local_original(coll, name) as source:
                folder = self.storage.scratch_folder(coll, cache_name)
                with self.vips.pyramid_built(source, folder, identity) as (made, size):
                    if not self.storage.store_derivative(coll, name, cache_name, made, identity):
                        raise ThumbnailError('The file changed while its pyramid was made: try again.')
            self.view_sizes.remember(identity, size)
            self.count_stored(coll, cache_name)

    def pyramid_size(self, coll: Coll, name: str, identity: Identity) -> tuple[int, int]:
        """The size of a stored pyramid's full level (its first TIFF page), remembered for the original's identity."""
        with self.storage.local_derivative(coll, pyramid_name(name)) as path:
            pages = tiff_pages(path)
        if not pages or not pages[0][0] or not pages[0][1]:
            raise ThumbnailError('This file is not an image that can be viewed.')
        self.view_sizes.remember(identity, pages[0][:2])
        return pages[0][:2]

    def cached_answer(self, coll: Coll, name: str, plan: Plan, identity: Identity) -> tuple[str | None, object]:
        """(cache name, what found it fresh) of an IIIF answer worth keeping: (None, False) for one too long to name."""
        cache_name = tile_name(name, *plan[:2])
        if len(cache_name.encode('utf-8', 'surrogatepass')) > 255:
            return None, False
        return cache_name, self.storage.derivative_is_fresh(coll, name, cache_name, identity)

    @contextlib.contextmanager
    def cut(self, coll: Coll, name: str, plan: Plan, identity: Identity,
            cache_name: str | None = None) -> typing.Iterator[tuple[bool, str | None]]:
        """Yield (stored, path): an IIIF answer cut from the original's pyramid (made if need be). When `cache_name`
        is given and the original is unchanged it is stored under it (stored true, the path gone); else `path` is
        the scratch file, removed when the caller is done."""
        with self.scheduler.admitted(INTERACTIVE):
            self.ensure_pyramid(coll, name, identity)
            with self.storage.local_derivative(coll, pyramid_name(name)) as pyramid:
                folder = self.storage.scratch_folder(coll, cache_name or pyramid_name(name))
                with self.vips.iiif_cut(pyramid, plan, folder) as made:
                    if cache_name and self.storage.store_derivative(coll, name, cache_name, made, identity):
                        self.count_stored(coll, cache_name)
                        yield True, None
                    else:
                        yield False, made

    # --- Bounds -----------------------------------------------------------------------------------------------

    def keep_within_bounds(self, coll: Coll, name: str, scale: int, webp: bool) -> None:
        """After storing a thumbnail: remove what OtherScales says is too many of other scales, and count it
        against THUMBNAIL_CACHE_MAX_BYTES."""
        if scale not in self.ladder:
            for (old_coll, _), cache_name in self.other_scales.added((coll, name), thumbnail_name(name, scale, webp)):
                self.storage.remove_derivative(old_coll, cache_name)
        self.count_stored(coll, thumbnail_name(name, scale, webp))

    def count_stored(self, coll: Coll, cache_name: str) -> None:
        """Count a derivative just stored against THUMBNAIL_CACHE_MAX_BYTES (a sweep starts when one is due)."""
        if self.cache_size:
            self.start_cache_sweep(self.storage.stored_size(self.storage.derivative_parts(coll, cache_name)))

    def start_cache_sweep(self, added: int = 0) -> None:
        """Count `added` bytes of new derivative; when a sweep is due, run one in a thread of its own."""
        if self.cache_size.sweep_due(added):
            threading.Thread(target=self.sweep_cache, daemon=True, name='thumbnail-cache-sweep').start()

    def sweep_cache(self) -> None:
        """Count the cached derivatives and, over the bound, remove the least recently made down to 90% of it, those
        of scales not configured first; two listings, holding only what is to be removed."""
        try:
            total = self.bring_within_bound(self.cache_size, self.cache_size.spare_newer_than)[0]
        except Exception:          # a store that failed is counted again at the next sweep
            log.exception('thumbnail cache sweep failed')
            total = None
        self.cache_size.swept(total)

    def bring_within_bound(self, cache: 'CacheSize', spare_newer_than: float,
                           dry_run: bool = False) -> tuple[int, int, int]:
        """Over the `cache` size's bound (set first from the originals' bytes when it is a share), remove the least
        recently made derivatives down to 90% of it: (the total left, files removed, bytes removed)."""
        total = sum(size for *_, size, _modified in self.cached_derivatives())
        if cache.share is not None:
            originals = sum(self.storage.originals_bytes(coll) for coll in self.storage.every_collection())
            cache.bound = int(cache.share * originals) or None
            if cache.bound is None and total:
                log.warning('Thumbnails are cached but no originals were counted (a folder not mounted, a wrong S3 '
                            'prefix?): none is removed for THUMBNAIL_CACHE_MAX_BYTES until originals are counted')
        removed = freed = 0
        if cache.bound is not None and total > cache.bound:
            for coll, cache_name, size in self._oldest_covering(total - cache.bound * 9 // 10, spare_newer_than):
                if not dry_run:
                    self.storage.remove_derivative(coll, cache_name)
                total, removed, freed = total - size, removed + 1, freed + size
        return total, removed, freed

    def _oldest_covering(self, excess: int, spare_newer_than: float) -> list[tuple[Coll, str, int]]:
        """The fewest thumbnails, first in removal order (other scales, then the least recently made), whose sizes
        add up to at least `excess`; never one made in the last `spare_newer_than` seconds (it may be being sent)."""
        newest_first, covered = [], 0          # a heap whose top is the last in removal order
        spared_from = time.time() - spare_newer_than
        for coll, cache_name, size, modified in self.cached_derivatives():
            if modified > spared_from:
                continue
            configured = parse_derivative(cache_name).scale in self.ladder
            heapq.heappush(newest_first, (-configured, -modified, coll, cache_name, size))
            covered += size
            while covered - newest_first[0][4] >= excess:
                covered -= heapq.heappop(newest_first)[4]
        return [(coll, cache_name, size) for *_, coll, cache_name, size in newest_first]

    def cached_derivatives(self) -> typing.Iterator[tuple[Coll, str, int, float]]:
        """(collection, cache name, size, modification time) of every cached derivative, in every collection folder."""
        for coll in self.storage.every_collection():
            for cache_name, size, modified in self.storage.derivatives(coll):
                yield coll, cache_name, size, modified


class OtherScales:
    """The cached thumbnails of scales that are not configured, per original, newest last: each original keeps
    at most `per_original`, and at most `originals` originals are followed (the least recently added to is
    dropped, its thumbnails with it), so no client can fill the cache by asking for every scale."""

    def __init__(self, per_original: int, originals: int) -> None:
        self.per_original, self.originals = per_original, originals
        self.kept, self.lock = collections.OrderedDict(), threading.Lock()

    def added(self, owner: tuple, cache_name: str) -> list[tuple[tuple, str]]:
        """Note a thumbnail just stored for `owner`; return the (owner, cache name)s to remove now."""
        with self.lock:
            names = [kept for kept in self.kept.pop(owner, []) if kept != cache_name] + [cache_name]
            self.kept[owner] = names[-self.per_original:]
            removed = [(owner, old) for old in names[:-self.per_original]]
            while len(self.kept) > self.originals:
                dropped, old_names = self.kept.popitem(last=False)
                removed += [(dropped, old) for old in old_names]
            return removed

    def scales_of(self, owner: tuple) -> set[int]:
        """The scales of the plain thumbnails kept for `owner`."""
        with self.lock:
            names = list(self.kept.get(owner, ()))
        return {parsed.scale for parsed in map(parse_derivative, names) if parsed and not parsed.webp}


class CacheSize:
    """The cached thumbnails' total size against THUMBNAIL_CACHE_MAX_BYTES: unknown until a sweep has counted it,
    then added to as thumbnails are stored; over the bound, a sweep is due, at most one every `sweep_every` seconds.
    A bound given as a `share` of the originals' bytes is set by each sweep, which counts them too."""

    def __init__(self, bound: int | None, share: float | None = None, sweep_every: float = 60,
                 spare_newer_than: float = 60) -> None:
        self.bound, self.share, self.sweep_every, self.spare_newer_than = bound, share, sweep_every, spare_newer_than
        self.total, self.sweeping, self.last_sweep = None, False, -math.inf
        self.lock = threading.Lock()

    def sweep_due(self, added: int = 0) -> bool:
        """Count `added` bytes; True when a sweep should start now (the caller then runs it and calls swept)."""
        with self.lock:
            if self.total is not None:
                self.total += added
            over = self.total is None or self.bound is None or self.total > self.bound
            if not over or self.sweeping or time.monotonic() - self.last_sweep < self.sweep_every:
                return False
            self.sweeping = True
            return True

    def swept(self, total: int | None) -> None:
        with self.lock:
            self.total, self.sweeping, self.last_sweep = total, False, time.monotonic()


class ViewSizes:
    """The size as shown of recently viewed originals, by their identity (at most `entries`, the oldest forgotten
    first): a cached tile is answered without reading the original or its pyramid."""

    def __init__(self, entries: int) -> None:
        self.sizes, self.lock = cachetools.LRUCache(entries), threading.Lock()

    def get(self, identity: Identity) -> tuple[int, int] | None:
        with self.lock:
            return self.sizes.get(identity)

    def remember(self, identity: Identity, size: tuple[int, int]) -> None:
        with self.lock:
            self.sizes[identity] = size
