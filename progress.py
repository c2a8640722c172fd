"""Progress of a long administration command on standard error: a bar redrawn in place on a terminal, and a
plain line every few seconds elsewhere (a log file, journalctl, a pipe), so the log shows it going on; what the
command says meanwhile goes on a line of its own. Shared by derivatives.py and migrate.py."""

import threading
import time

TERMINAL_EVERY = 0.2    # seconds between redraws of the bar on a terminal
LINE_EVERY = 5          # seconds between progress lines when standard error is not a terminal
WIDTH = 30              # characters of the bar


class Progress:
    """`total` things done one by one (with `total_bytes`, their bytes counted too), their rate and time left."""

    def __init__(self, total, stream, what='files', total_bytes=None):
        self.total, self.stream, self.what, self.total_bytes = total, stream, what, total_bytes
        self.tty = stream.isatty()
        self.done = self.bytes = 0
        self.started = self.shown = time.monotonic()
        self.lock = threading.Lock()        # several jobs report at once

    def advance(self, size=0):
        """One more done (of `size` bytes); shown when it is time, and at the last."""
        with self.lock:
            self.done += 1
            self.bytes += size
            now = time.monotonic()
            if now - self.shown >= (TERMINAL_EVERY if self.tty else LINE_EVERY) or self.done == self.total:
                self._show(now)

    def say(self, message):
        """A message on a line of its own (the bar drawn again below it on a terminal)."""
        with self.lock:
            self.stream.write(('\r\x1b[K' if self.tty else '') + message + '\n')
            if self.tty:
                self._show(time.monotonic())

    def close(self):
        if self.tty and self.done:
            self.stream.write('\n')

    def _show(self, now):
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        if self.total_bytes:
            share, rate = self.bytes / self.total_bytes, f'{self.bytes / elapsed / 1e6:.1f} MB/s'
            amount = f', {self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB'
        else:
            share, rate, amount = self.done / max(self.total, 1), f'{self.done / elapsed:.1f}/s', ''
        left = elapsed * (1 - share) / share if share else None
        eta = '--:--:--' if left is None else time.strftime('%H:%M:%S', time.gmtime(min(left, 359999)))
        bar = '#' * int(WIDTH * min(share, 1))
        line = f'[{bar:<{WIDTH}}] {self.done}/{self.total} {self.what}{amount}, {rate}, ETA {eta}'
        self.stream.write(f'\r{line}\x1b[K' if self.tty else line + '\n')
        self.stream.flush()
