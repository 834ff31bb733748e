"""Progress on stderr: a count and an ETA, and warnings/errors printed around it.

- interactive (the stream is a terminal): a tqdm bar; without tqdm, one line rewritten in place
  ("[k/n] desc  ETA m:ss");
- non-interactive (a log file, CI): a plain "[k/n] desc  ETA m:ss" line at every tenth of the
  run (and at least every ``every_s`` seconds), never a line per measurement.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, *, stream: Optional[TextIO] = None, interactive: Optional[bool] = None,
                 use_tqdm: bool = True, desc: str = "pydl.bench", every_s: float = 60.0):
        self.total, self.n, self.stream = max(0, total), 0, stream or sys.stderr
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive, self.every_s, self.desc = interactive, every_s, desc
        self.t0 = self._last = time.monotonic()
        self._next_tenth = 1
        self._line = ""
        self.bar = None
        if interactive and use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, file=self.stream, unit="cell", desc=desc,
                                dynamic_ncols=True, leave=True)

    def _status(self, desc: str) -> str:
        el = time.monotonic() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else float("nan")
        eta_s = _clock(eta) if eta == eta else "?"
        return f"[{self.n}/{self.total}] {desc}  elapsed {_clock(el)}  ETA {eta_s}"

    def update(self, desc: str = "", n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(desc[-60:], refresh=False)
            self.bar.update(n)
            return
        line = self._status(desc)
        if self.interactive:
            self._line = line
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            return
        now = time.monotonic()
        tenth = self.n * 10 // self.total if self.total else 10
        if tenth >= self._next_tenth or now - self._last >= self.every_s or self.n == self.total:
            self._next_tenth = tenth + 1
            self._last = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def write(self, msg: str) -> None:
        """A line that must be seen (a warning, an error), without breaking the bar."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
            return
        if self.interactive and self._line:
            self.stream.write("\r\033[K" + msg + "\n" + self._line)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.interactive and self._line:
            self.stream.write("\n")
            self.stream.flush()
