"""SHA-256 checksums of an output folder (a checkpoint, an HF export), in ``sha256sum`` format.

``FOLDER/SHA256SUMS`` lists every file of the folder (sub-folders included) as
``<hex digest>  <relative path>``, so ``cd FOLDER && sha256sum -c SHA256SUMS`` checks it
without our code. :func:`verify_folder` reports a file that differs from, is missing from,
or is not listed in the record; every caller turns the problems into one error that names
the damaged files.

Hashing reads what was just written (the page cache), about 1.7 GB/s per core with SHA
instructions (docs/benchmarks.md); the trainer does it in a background thread per rank,
each rank hashing its share of the files (:func:`share`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence

SUMS = "SHA256SUMS"
IGNORED = (SUMS, SUMS + ".tmp")
"""Names never listed (the record itself)."""
_CHUNK = 8 << 20


class ChecksumError(ValueError):
    """A folder's files do not match their recorded checksums."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of one file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def folder_files(folder: str) -> List[str]:
    """Every file under ``folder`` as a sorted relative path (the record excluded)."""
    out = []
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(here, name), folder)
            if rel not in IGNORED:
                out.append(rel)
    return sorted(out)


def share(names: Sequence[str], rank: int, world: int) -> List[str]:
    """The files rank ``rank`` of ``world`` hashes or checks (round robin over sorted names)."""
    return list(names[rank::world])


def hash_files(folder: str, names: Sequence[str]) -> Dict[str, str]:
    """``{relative path: digest}`` of ``names`` under ``folder``."""
    return {name: file_sha256(os.path.join(folder, name)) for name in names}


def write_sums(folder: str, sums: Dict[str, str]) -> str:
    """Write ``folder/SHA256SUMS`` atomically (temp name, flush, rename); returns its path."""
    for name in sums:
        if "\n" in name or name in IGNORED:
            raise ValueError(f"cannot record {name!r} in {SUMS}")
    path = os.path.join(folder, SUMS)
    with open(path + ".tmp", "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return path


def read_sums(folder: str) -> Optional[Dict[str, str]]:
    """The recorded ``{relative path: digest}``, or None when the folder has no record."""
    path = os.path.join(folder, SUMS)
    if not os.path.isfile(path):
        return None
    sums = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            digest, sep, name = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64 or not name:
                raise ChecksumError(f"{path}: line {number} is not '<sha256>  <file>': {line!r}")
            sums[name] = digest
    return sums


def verify_folder(folder: str, sums: Dict[str, str], names: Optional[Sequence[str]] = None,
                  complete: bool = True) -> List[str]:
    """Problems of ``names`` (default: every recorded file) against ``sums``: damaged
    (digest differs) or missing files, and with ``complete`` files present but not recorded.
    An empty list means every checked byte is as it was written."""
    problems = []
    for name in sorted(sums) if names is None else names:
        path = os.path.join(folder, name)
        if name not in sums:
            problems.append(f"{path}: not recorded in {SUMS}")
        elif not os.path.isfile(path):
            problems.append(f"{path}: missing (recorded in {SUMS})")
        elif file_sha256(path) != sums[name]:
            problems.append(f"{path}: damaged (SHA-256 differs from {SUMS})")
    if complete:
        problems += [f"{os.path.join(folder, n)}: not recorded in {SUMS}"
                     for n in folder_files(folder) if n not in sums]
    return problems


def check_folder(folder: str, what: str = "folder", required: bool = False) -> bool:
    """Verify a whole folder in this process. Raises :class:`ChecksumError` naming every
    damaged, missing or unrecorded file; returns False (nothing checked) when the folder
    has no record and ``required`` is false."""
    sums = read_sums(folder)
    if sums is None:
        if required:
            raise ChecksumError(f"{what} {folder} has no {SUMS}: its files cannot be verified")
        return False
    problems = verify_folder(folder, sums)
    if problems:
        raise ChecksumError(f"{what} {folder} failed verification:\n  " + "\n  ".join(problems))
    return True
