"""Make the configured thumbnail scales of the originals already stored, or prune the derivatives not needed.

    python derivatives.py generate [--collection NAME] [--jobs N] [--nice N] [--pause SECONDS] [--dry-run]
    python derivatives.py prune    [--collection NAME] [--dry-run]

Settings are the server's own (settings.py, then the environment), so the command works on the
storage the live server uses, a folder or a bucket (STORAGE=s3), and makes PREGENERATE_SCALE.

generate makes every configured scale of every original (of the collection named, with
COLLECTION_DIRS, or of all), the largest first and each smaller one from it, as the server does
after an upload. Conversions run in parallel (--jobs, default one per CPU), at a lower priority
(--nice, default 10, which the conversions inherit) and with a rest after each (--pause), so a live
server on the same machine stays responsive. It can be stopped at any moment and started again:
an original whose configured scales are all fresh is skipped without converting, decided from one
listing of its thumbnails folder (no check per file), and a killed run's scratch folders are removed
once they are an hour old, as the server does when it starts. A file that cannot be thumbnailed (broken,
of a kind with no thumbnail, gone meanwhile) is named on standard error, counted and passed over.

prune removes the thumbnails of scales that are not configured and those whose original is gone,
then, over THUMBNAIL_CACHE_MAX_BYTES, the least recently made derivatives (IIIF and other scales first)
down to 90% of it, and says how many files and bytes that frees. It removes only thumbnail cache names
(<root>_<scale><ext>) in thumbnails folders: never an original, another file, or a conversion's
temporary. --dry-run changes nothing and says what would be made or removed.

The exit status is 0 when the run went through (single files may have failed: see the counts),
1 when it could not (bad settings, the storage unreachable, no room left).
"""

import argparse
import contextlib
import os
import sys
import threading
import time
import types

from cache import DerivativeCache
from config import ConfigError, conversion_threads, load_config
from engines.imagemagick import ImageMagick
from engines.scheduling import BACKGROUND, Scheduler
from engines.vips import Vips
from errors import ObjectChanged, StorageUnavailable, ThumbnailError
from files import NO_SPACE
from kinds import kind_of
from names import parse_derivative, printable
from progress import Progress
from storages import make_storage


class Stop(Exception):
    """The run cannot go on: the storage is unreachable, or there is no room for thumbnails."""


def collections(config, chosen):
    """The collections to walk: the one chosen, or one name per collection folder (None: the one folder)."""
    folders = config.COLLECTION_DIRS
    if folders is None:
        if chosen is not None:
            raise ConfigError('--collection needs COLLECTION_DIRS (without it there is one folder for all)')
        return [None]
    if chosen is not None:
        if chosen not in folders:
            raise ConfigError(f'COLLECTION_DIRS names no collection {chosen!r}')
        return [chosen]
    first = {}
    for coll, folder in folders.items():       # two names for one folder: walked once
        first.setdefault(folder, coll)
    return list(first.values())


def label(coll, name):
    """How a file is named in messages: its collection and name, control characters escaped."""
    return printable(name if coll is None else f'{coll}/{name}')


def missing_scales(storage, coll, scales):
    """(name, the configured scales it has no fresh thumbnail of) for each original of the collection, from
    one listing of its thumbnails and one of its originals: fresh is not older than the original."""
    position = {scale: at for at, scale in enumerate(scales)}
    made = {}               # original's name -> the times of its thumbnails at the configured scales
    for cache, _size, modified in storage.derivatives(coll):
        derivative = parse_derivative(cache)
        owner, scale = derivative.source, derivative.scale
        if scale in position and not derivative.webp:          # a WebP is made when a browser first asks
            made.setdefault(owner, [None] * len(scales))[position[scale]] = modified
    shared = {}             # one tuple per combination of scales: a long to-do list holds names, not copies
    for name, modified in storage.originals_modified(coll):
        times = made.pop(name, None) or [None] * len(scales)
        missing = tuple(scale for scale, at in zip(scales, times) if at is None or at < modified)
        yield name, shared.setdefault(missing, missing)


class PacedImageMagick(ImageMagick):
    """The server's ImageMagick engine, counting its conversions and resting `pause` s after each."""

    def __init__(self, config, scheduler, pause):
        super().__init__(config, scheduler)
        self.pause, self.made, self.counting = pause, 0, threading.Lock()

    @contextlib.contextmanager
    def converted(self, *args, **kwargs):
        with super().converted(*args, **kwargs) as made:
            yield made
        with self.counting:
            self.made += 1
        if self.pause:
            time.sleep(self.pause)


def cache_for(config, storage, jobs=1, pause=0):
    """The server's derivative cache of `storage`, whose `jobs` background conversions may all run at once
    (background work leaves one slot free for interactive work, which this process has none of)."""
    config = types.SimpleNamespace(**{**vars(config), 'THUMBNAIL_WORKERS': jobs + 1})
    scheduler = Scheduler(config, conversion_threads(config))
    imagemagick = PacedImageMagick(config, scheduler, pause)
    return DerivativeCache(config, storage, scheduler, imagemagick, Vips(config, scheduler, imagemagick))


def thumbnailable(storage, coll, name, kinds):
    """Whether the original's first bytes are of a kind that gets thumbnails (read without fetching it whole)."""
    with storage.open(coll, name) as original:
        return kind_of(original.read(1024)) in kinds


def make_one(cache, coll, name, scales):
    """Make an original's missing thumbnails, largest first; None, or why they could not be (the run goes on).
    Stop when no other file could be made either."""
    try:
        if not thumbnailable(cache.storage, coll, name, cache.imagemagick.kinds):
            return 'No thumbnail can be made from this kind of file.'
        for scale in scales:            # the largest first: each smaller one is made from the one before
            cache.ensure_thumbnail(coll, name, scale, work=BACKGROUND)
        return None
    except (ThumbnailError, ObjectChanged) as error:
        return str(error)
    except FileNotFoundError:
        return 'No such file.'
    except StorageUnavailable as error:
        raise Stop(f'the storage is unavailable: {error}') from None
    except OSError as error:
        if error.errno in NO_SPACE:
            raise Stop('there is no room left for thumbnails') from None
        return error.strerror or str(error)
    except Exception as error:          # a fault of ours with one file: named, counted, the run goes on
        return f'unexpected {type(error).__name__}: {error}'


def generate(cache, colls, scales, jobs, dry_run):
    """Make the missing scales of every original of `colls`, `jobs` at a time; the summary line to print."""
    storage = cache.storage
    todo, originals = [], 0
    for coll in colls:
        for name, missing in missing_scales(storage, coll, scales):
            originals += 1
            if missing:
                todo.append((coll, name, missing))
    fresh = originals - len(todo)
    if dry_run:
        return (f'would make {sum(len(missing) for *_, missing in todo)} thumbnails of {len(todo)} originals; '
                f'{fresh} of {originals} originals already fresh')
    sys.stderr.write(f'{originals} originals, {fresh} already fresh, {len(todo)} to make '
                     f'(scales {", ".join(map(str, scales))}), {jobs} at a time\n')
    progress, failed, stopped = Progress(len(todo), sys.stderr, 'originals'), [0], []
    pending, taking, started = iter(todo), threading.Lock(), time.monotonic()

    def work():
        while not stopped:
            with taking:
                coll, name, missing = next(pending, (None, None, None))
            if name is None:
                return
            try:
                problem = make_one(cache, coll, name, missing)
            except Stop as error:
                stopped.append(error)
                return
            if problem:
                with taking:
                    failed[0] += 1
                progress.say(f'failed: {label(coll, name)}: {problem}')
            progress.advance()
    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(jobs, len(todo)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    progress.close()
    if stopped:
        raise stopped[0]
    seconds = time.monotonic() - started
    return (f'{originals} originals: {fresh} already fresh, {len(todo) - failed[0]} done, {failed[0]} failed; '
            f'made {cache.imagemagick.made} thumbnails in {seconds:.1f} s '
            f'({len(todo) / max(seconds, 1e-6):.1f} originals/s)')


def prune(cache, colls, scales, dry_run):
    """Remove the thumbnails of scales not configured and the derivatives whose original is gone (IIIF pyramids
    and answers of originals still stored are kept: viewers made them); the summary line."""
    storage, wanted, counts = cache.storage, set(scales), {'of scales not configured': [0, 0], 'orphans': [0, 0]}
    for coll in colls:
        originals = set(storage.originals(coll))
        for cache_name, size, _modified in storage.derivatives(coll):
            owner, scale = parse_derivative(cache_name)[:2]
            if scale is not None and scale not in wanted:
                why = 'of scales not configured'
            elif owner not in originals and not storage.exists(coll, owner):    # not stored since the listing
                why = 'orphans'
            else:
                continue
            if not dry_run:
                storage.remove_derivative(coll, cache_name)
            counts[why][0] += 1
            counts[why][1] += size
    files, freed = (sum(count[at] for count in counts.values()) for at in (0, 1))
    details = ', '.join(f'{count} {why}' for why, (count, _size) in counts.items())
    summary = (f'{"would remove" if dry_run else "removed"} {files} thumbnails, {freed} bytes '
               f'({freed / 1e6:.1f} MB): {details}')
    return summary + within_bound(cache, dry_run)


def within_bound(cache, dry_run):
    """Bring the whole cache under THUMBNAIL_CACHE_MAX_BYTES as the server's sweep does, but at once and sparing
    nothing: what that removed, and what the cache now holds."""
    if not cache.cache_size:
        return ''
    total, files, freed = cache.bring_within_bound(cache.cache_size, spare_newer_than=0, dry_run=dry_run)
    if cache.cache_size.bound is None:
        return (f'; no originals counted, so nothing removed for THUMBNAIL_CACHE_MAX_BYTES '
                f'(the cache holds {total} bytes)')
    return (f'; over THUMBNAIL_CACHE_MAX_BYTES ({cache.cache_size.bound} bytes) '
            f'{"would remove" if dry_run else "removed"} {files} more, {freed} bytes, leaving {total} bytes')


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('action', choices=['generate', 'prune'])
    parser.add_argument('--collection', help='only this collection (a COLLECTION_DIRS name)')
    parser.add_argument('--dry-run', action='store_true', help='change nothing; say what would be made or removed')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1, help='conversions at once (default: CPUs)')
    parser.add_argument('--nice', type=int, default=10, choices=range(20), metavar='0-19',
                        help='lower the priority of the command and its conversions by this much (default 10)')
    parser.add_argument('--pause', type=float, default=0.0,
                        help='seconds each job rests after a conversion (default 0)')
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.pause < 0:
        parser.error('--jobs must be 1 or more and --pause 0 or more')
    return args


def main(argv=None, environ=None):
    args = arguments(argv)
    os.nice(args.nice)
    try:
        config = load_config(environ=environ)
        if not config.PREGENERATE_SCALES:
            raise ConfigError('PREGENERATE_SCALE names no scale (to make, or to keep when pruning)')
        colls = collections(config, args.collection)
        storage = make_storage(config)
        health = storage.health()
        if health != 'ok':
            raise Stop(f'the storage is {health}')
        if args.action == 'prune':
            print(prune(DerivativeCache(config, storage, None, None, None), colls, config.PREGENERATE_SCALES,
                        args.dry_run))
        else:
            if not args.dry_run:
                storage.sweep_temporaries()         # a killed run's scratch folders, once an hour old (as at start-up)
            cache = cache_for(config, storage, args.jobs, args.pause)
            print(generate(cache, colls, config.PREGENERATE_SCALES, args.jobs, args.dry_run))
    except ConfigError as error:
        sys.exit(f'derivatives: {error}')
    except (Stop, StorageUnavailable) as error:
        sys.exit(f'derivatives: {error}; run it again when that is mended (it resumes)')
    except KeyboardInterrupt:
        sys.exit('derivatives: interrupted; run it again to go on where it stopped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
