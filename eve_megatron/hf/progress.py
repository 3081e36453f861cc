"""A progress bar in the launching process that follows rank 0 of a multi-rank job.

The ranks' output goes to log files, so rank 0 writes ``"done total"`` to a small file
(atomically) and :class:`FileProgress` polls it from a background thread.
"""

from __future__ import annotations

import os
import threading

from tqdm import tqdm


def write_progress(path: str, done: int, total: int) -> None:
    """Record ``done`` of ``total`` steps in ``path`` (replaced atomically)."""
    with open(path + ".part", "w") as f:
        f.write(f"{done} {total}")
    os.replace(path + ".part", path)


class FileProgress:
    """Context manager: a tqdm bar updated from ``path`` every ``interval`` seconds."""

    def __init__(self, path: str, desc: str, unit: str, enabled: bool = True,
                 interval: float = 0.5):
        self.path, self.interval = path, interval
        self.bar = tqdm(total=1, desc=desc, unit=unit, disable=not enabled)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _poll(self) -> None:
        try:
            with open(self.path) as f:
                done, total = map(int, f.read().split())
        except (OSError, ValueError):
            return
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> "FileProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.bar.close()
