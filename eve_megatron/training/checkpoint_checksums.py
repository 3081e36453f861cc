"""Checksums of distributed checkpoints: hashed by all ranks in the background after a save,
verified by all ranks before a load.

Every rank hashes its share of the checkpoint's files (:func:`eve_megatron.checksums.share`)
in a thread, so the training step that follows a save overlaps the hashing;
:meth:`PendingChecksums.finish` (collective) gathers the digests and rank 0 writes
``SHA256SUMS`` into the checkpoint folder. A run killed between the save and ``finish``
leaves a complete checkpoint without a record: it loads with a warning that it is
unverified. Verification splits the files over the ranks the same way.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, List, Optional

import torch

from eve_megatron.checksums import (SUMS, ChecksumError, folder_files, hash_files, read_sums,
                                    share, verify_folder, write_sums)
from eve_megatron.outputs import fsync_dir


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(value):
    rank, world = _rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _broadcast(value):
    if _rank_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class PendingChecksums:
    """This rank's share of a checkpoint being hashed in a background thread."""

    def __init__(self, folder: str):
        self.folder = folder
        rank, world = _rank_world()
        names = _broadcast(folder_files(folder) if rank == 0 else None)
        self._mine = share(names, rank, world)
        self._result: Dict = {}
        self.seconds = 0.0
        """How long this rank's hashing took (for benchmarks)."""
        self._thread = threading.Thread(target=self._hash, name="checkpoint-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        start = time.perf_counter()
        try:
            self._result = {"sums": hash_files(self.folder, self._mine)}
        except Exception as exc:  # reported by finish() on every rank
            self._result = {"error": f"{type(exc).__name__}: {exc}"}
        self.seconds = time.perf_counter() - start

    def finish(self) -> str:
        """Collective: wait for every rank's share, then rank 0 writes ``SHA256SUMS``.
        Returns the folder."""
        self._thread.join()
        results = _gather(self._result)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise ChecksumError(f"hashing checkpoint {self.folder} failed: {errors[0]}")
        if _rank_world()[0] == 0:
            merged = {}
            for r in results:
                merged.update(r["sums"])
            write_sums(self.folder, merged)
            fsync_dir(self.folder)
        if _rank_world()[1] > 1:
            torch.distributed.barrier()
        return self.folder


def verify_checkpoint(folder: str) -> bool:
    """Collective when a process group exists: every rank checks its share of the recorded
    files (rank 0 also looks for unrecorded ones). Raises :class:`ChecksumError` naming
    every damaged, missing or unrecorded file on every rank; returns False, after a warning,
    for a checkpoint without ``SHA256SUMS`` (a run stopped before its record was written)."""
    rank, world = _rank_world()
    try:
        sums = read_sums(folder)
        problems: Optional[List[str]] = None
        if sums is not None:
            problems = verify_folder(folder, sums, share(sorted(sums), rank, world),
                                     complete=False)
            if rank == 0:
                problems += [f"{os.path.join(folder, n)}: not recorded in {SUMS}"
                             for n in folder_files(folder) if n not in sums]
    except (OSError, ChecksumError) as exc:
        problems = [str(exc)]
    everyone = _gather(problems)
    if any(p is None for p in everyone):
        if rank == 0:
            print(f"warning: checkpoint {folder} has no {SUMS}; loading it unverified",
                  flush=True)
        return False
    found = sorted(set(p for ps in everyone for p in ps))
    if found:
        raise ChecksumError(f"checkpoint {folder} failed verification ({len(found)} problem(s)):"
                            "\n  " + "\n  ".join(found))
    return True
