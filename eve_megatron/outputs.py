"""Outputs written safely: one writer at a time, and durable before they become visible.

- :class:`OutputLock`: an exclusive OS lock (``flock``) on ``OUTPUT.lock`` beside an output
  (a dataset prefix, a checkpoint root, an export folder), held for the whole run and
  released by the kernel when the process dies, so a crashed writer never blocks the next
  one. The lock file records who holds it (pid, host, command) for the error message and
  is removed on a normal release (a killed writer leaves it behind, unlocked and harmless).
- :func:`fsync_tree` / :func:`fsync_dir`: flush files and folders to stable storage, so
  the rename that makes an output visible never exposes data still in the page cache
  (power-loss safe by construction).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Optional


class OutputBusyError(RuntimeError):
    """Another live process is writing the same output."""


class OutputLock:
    """``with OutputLock(path, "checkpoint root"):`` -- fails at once if another process
    holds ``path + ".lock"``."""

    def __init__(self, path: str, what: str = "output"):
        self.path = os.path.abspath(path.rstrip("/"))
        self.lock_path = self.path + ".lock"
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        """Take the lock or raise :class:`OutputBusyError` naming the holder."""
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputBusyError(f"{self.what} {self.path} is being written by {holder} "
                                      f"(lock {self.lock_path}); wait for it or choose another "
                                      "output") from None
            try:  # the holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: "
                      f"{' '.join(sys.argv)[:500]}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            try:
                os.unlink(self.lock_path)  # still ours: removed before anyone can lock it
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def error_text(exc: BaseException) -> str:
    """A CLI's one-line message for ``exc``: a KeyError's text without its quotes, an OSError
    with its file name (never a bare errno such as ``2``)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def lock_on_rank0(path: str, what: str) -> Optional[OutputLock]:
    """Collective: rank 0 takes the lock on ``path``; every rank raises the same
    :class:`OutputBusyError` when another live writer holds it. Returns rank 0's lock."""
    import torch

    lock, message = None, [None]
    if torch.distributed.get_rank() == 0:
        try:
            lock = OutputLock(path, what).acquire()
        except OutputBusyError as exc:
            message = [str(exc)]
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise OutputBusyError(message[0])
    return lock


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename or a new file in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush one file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)
