"""The libvips engine behind IIIF, the parent's side: a pyramid (tiled, multi-resolution TIFF) per original and
IIIF answers cut from it, each job run by engines/pyramids.py in a kept child under the conversion limits and
in the scheduler's slots. HEIC reaches libvips through ImageMagick and a PDF's first page through Ghostscript,
as PNG first."""

import contextlib
import json
import logging
import os
import sys
import time
import types
import typing

from engines.children import ChildFailed, ChildPool, ChildTimedOut
from engines.imagemagick import INPUT_CODERS, ImageMagick
from engines.scheduling import INTERACTIVE, PYRAMID, Scheduler
from errors import PassingFailure, ThumbnailError
from iiif import Plan
from kinds import sniff_kind
from names import Identity, printable

log = logging.getLogger('web_asset_server')

IIIF_KINDS = {'image/jpeg', 'image/png', 'image/gif', 'image/tiff', 'image/heic', 'image/heif', 'application/pdf'}
VIPS_KINDS = {'image/jpeg', 'image/png', 'image/gif', 'image/tiff'}     # read by libvips itself; others as PNG first
LOSSLESS_KINDS = {'image/png', 'image/gif'}    # their pyramids stay lossless (deflate); the rest are stored as JPEG
PDF_VIEW_SIZE = 4096            # long side in pixels of a PDF's first page as IIIF serves it (about 350 dpi for A4)


class Vips:
    """Pyramids and IIIF answers by libvips in children, bounded like thumbnails (ImageMagick's limits)."""

    def __init__(self, config: types.SimpleNamespace, scheduler: Scheduler, imagemagick: ImageMagick) -> None:
        self.scheduler, self.imagemagick, self.timeout = scheduler, imagemagick, config.THUMBNAIL_TIMEOUT
        self.children = ChildPool([sys.executable, '-m', 'engines.pyramids', 'serve'], config.THUMBNAIL_WORKERS,
                                  imagemagick.environment(config.BASE_DIR), imagemagick.limit_child)

    def run_job(self, job: str, args: list, scratch: str, deadline: float) -> str:
        """What a libvips job printed; ThumbnailError when it fails, ends or overruns the deadline (PassingFailure
        when its child could not start or was killed by another: worth trying again)."""
        try:
            answer, _data = self.children.run(job, args, scratch, deadline)
        except ChildTimedOut:
            log.warning('IIIF %s killed after %s s (THUMBNAIL_TIMEOUT)', job, self.timeout)
            raise ThumbnailError('Making the image took too long.') from None
        except ChildFailed as failure:
            if failure.at_start:
                log.warning('could not start the IIIF engine: %s', failure)
            passing = failure.at_start or failure.killed
            raise (PassingFailure if passing else ThumbnailError)('This file could not be viewed.') from None
        if not answer.get('ok'):
            log.info('IIIF %s failed: %s', job, printable(str(answer.get('error', '')))[:500])
            raise ThumbnailError('This file could not be viewed.')
        return str(answer.get('printed', ''))

    @contextlib.contextmanager
    def pyramid_built(self, source: str, folder: str,
                      identity: Identity | None) -> typing.Iterator[tuple[str, tuple[int, int]]]:
        """Yield (path, (width, height) as shown) of the IIIF pyramid of `source` made by libvips in a child
        (HEIC through ImageMagick, a PDF's first page through Ghostscript, as PNG first); a failure is remembered
        under `identity`, so a corrupt original costs one attempt, not one per tile."""
        self.scheduler.raise_remembered_failure(identity, PYRAMID)
        kind = sniff_kind(source)
        if kind not in IIIF_KINDS or kind not in self.imagemagick.kinds:
            self.scheduler.remembering(identity, PYRAMID, raise_unviewable)
        self.scheduler.remembering(identity, PYRAMID, lambda: self.imagemagick.check_header(source, kind))
        with self.imagemagick.scratch_for(source, folder) as scratch:
            with self.scheduler.slots(INTERACTIVE):     # a viewer waits
                deadline = time.monotonic() + self.timeout
                built = self.scheduler.remembering(identity, PYRAMID, lambda: self._build(kind, scratch, deadline))
                shown = built.split()
            if len(shown) != 2 or not all(part.isdigit() for part in shown):
                self.scheduler.remembering(identity, PYRAMID, raise_unviewable)
            made = os.path.join(scratch, 'pyramid')
            with open(made, 'rb') as out:
                os.fsync(out.fileno())
            yield made, (int(shown[0]), int(shown[1]))

    def _build(self, kind: str, scratch: str, deadline: float) -> str:
        """Run the tools that make scratch/pyramid from scratch/in; return what the builder printed."""
        source = 'in'
        if kind == 'application/pdf':
            self.imagemagick.render_page(scratch, PDF_VIEW_SIZE, deadline)
            source = 'page.png'
        elif kind not in VIPS_KINDS:
            magick = self.imagemagick
            magick.run(magick.convert, *magick.limits, f'{INPUT_CODERS[kind]}:in[0]', '-auto-orient', '-colorspace',
                       'sRGB', '-depth', '8', '-strip', 'png:whole.png', scratch=scratch, deadline=deadline)
            source = 'whole.png'
        compression = 'lossless' if kind in LOSSLESS_KINDS else 'jpeg'
        return self.run_job('build', [source, 'pyramid', compression], scratch, deadline)

    @contextlib.contextmanager
    def iiif_cut(self, pyramid: str, plan: Plan, folder: str) -> typing.Iterator[str]:
        """Yield the path of the answer an IIIF plan asks, cut from a pyramid by libvips in a child, in a
        conversion slot like a thumbnail, removed after; the caller holds the scheduler's admission."""
        job = json.dumps({'region': plan.region, 'size': plan.size, 'mirror': plan.mirror,
                          'rotation': plan.rotation, 'quality': plan.quality, 'format': plan.format})
        with self.imagemagick.scratch_for(pyramid, folder) as scratch:
            with self.scheduler.slots(INTERACTIVE):     # a viewer waits
                self.run_job('cut', ['in', 'out', job], scratch, time.monotonic() + self.timeout)
            yield os.path.join(scratch, 'out')


def raise_unviewable() -> typing.NoReturn:
    raise ThumbnailError('This file is not an image that can be viewed.')
