#!/usr/bin/env python
"""Split big files into pieces that fit one device call, and join them back, verified.

A device call carries at most 64 MiB of our files, so a wheel such as Transformer Engine's
core (~276 MB) travels as pieces of at most ``--piece-mib`` (default 60), one or more
calls apiece; the pieces stay on the machine while it is kept warm. ``split`` writes
``NAME.partNN`` files and ``NAME.pieces.json`` (sizes and sha256 of every piece and of the
whole); ``join`` checks every piece, writes the file under a temporary name, checks the
whole and renames it.

    python tools/gpu/pieces.py split big.whl --out .gpukit/pieces
    python tools/gpu/pieces.py join .gpukit/pieces/big.whl.pieces.json --out .gpukit/wheels
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import List

MIB = 2**20
CHUNK = 8 * MIB


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split(path: str, out_dir: str, piece_bytes: int = 60 * MIB) -> str:
    """Write ``out_dir/NAME.partNN`` pieces and their manifest; returns the manifest path."""
    if piece_bytes <= 0:
        raise ValueError(f"piece size must be positive, got {piece_bytes}")
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(path)
    pieces: List[dict] = []
    with open(path, "rb") as src:
        while True:
            data = src.read(piece_bytes)
            if not data and pieces:
                break
            piece = f"{name}.part{len(pieces):02d}"
            _write_atomic(os.path.join(out_dir, piece), data)
            pieces.append({"file": piece, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            if len(data) < piece_bytes:
                break
    manifest = {"name": name, "bytes": os.path.getsize(path), "sha256": _sha256(path),
                "pieces": pieces}
    path_out = os.path.join(out_dir, name + ".pieces.json")
    _write_atomic(path_out, json.dumps(manifest, indent=1).encode())
    return path_out


def join(manifest_path: str, out_dir: str) -> str:
    """Reassemble the file a manifest describes into ``out_dir``; every piece and the whole
    are checked (a missing or damaged piece is named). Returns the file's path."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    where = os.path.dirname(os.path.abspath(manifest_path))
    for piece in manifest["pieces"]:
        path = os.path.join(where, piece["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"piece {piece['file']} of {manifest['name']} is missing "
                                    f"from {where} (bring it in an earlier call)")
        if os.path.getsize(path) != piece["bytes"] or _sha256(path) != piece["sha256"]:
            raise ValueError(f"piece {piece['file']} of {manifest['name']} is damaged")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, manifest["name"])
    tmp = target + ".tmp"
    with open(tmp, "wb") as dst:
        for piece in manifest["pieces"]:
            with open(os.path.join(where, piece["file"]), "rb") as src:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
    if _sha256(tmp) != manifest["sha256"]:
        os.remove(tmp)
        raise ValueError(f"{manifest['name']}: the joined file does not match its sha256")
    os.replace(tmp, target)
    return target


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--piece-mib", type=float, default=60.0)
    j = sub.add_parser("join")
    j.add_argument("manifest")
    j.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "split":
            print(split(a.file, a.out, int(a.piece_mib * MIB)))
        else:
            print(join(a.manifest, a.out))
    except (OSError, ValueError) as exc:
        print(f"pieces: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
