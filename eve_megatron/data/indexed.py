"""The on-disk indexed dataset: ``PREFIX.bin`` (records) + ``PREFIX.idx`` (index).

``.bin`` holds one record per sample: its text tokens (int32), its loss mask (uint8),
then the encoded bytes of each of its images, padded to 8 bytes. ``.idx`` (little
endian) is ``MAGIC``, version, sample count, image count, a JSON metadata blob, then
8-byte-aligned arrays (see ``_SAMPLE_FIELDS`` / ``_IMAGE_FIELDS``). Per-sample lengths
and image sizes live in ``.idx`` so that packing never opens ``.bin``.

Both files are written under ``*.tmp`` names and renamed by :meth:`IndexedDatasetWriter.finalize`.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from eve_megatron.outputs import fsync_dir

MAGIC = b"EVEMMIDX"
VERSION = 1
# (name, dtype): sample arrays have n rows (image_start n + 1), image arrays m rows
_SAMPLE_FIELDS = (("record_offset", "<i8"), ("text_len", "<i4"), ("seq_len", "<i4"),
                  ("image_tokens", "<i4"))
_IMAGE_FIELDS = (("image_offset", "<i8"), ("image_nbytes", "<i8"), ("image_h", "<i4"),
                 ("image_w", "<i4"), ("image_pos", "<i4"))


def _pad8(n: int) -> int:
    return (-n) % 8


@dataclass
class StoredImage:
    """One image of a sample: encoded bytes, its block grid and its splice position."""

    data: bytes
    hp: int
    """Height in 32-pixel blocks (h')."""
    wp: int
    """Width in 32-pixel blocks (w')."""
    pos: int
    """Index of the text token the image span is spliced before (== text_len: at the end)."""

    @property
    def num_tokens(self) -> int:
        """``1 + h'(w'+1)``."""
        return 1 + self.hp * (self.wp + 1)


@dataclass
class StoredSample:
    """A sample read back from ``.bin``."""

    tokens: np.ndarray
    """int64 ``[text_len]`` text token ids."""
    loss_mask: np.ndarray
    """uint8 ``[text_len]``, 1 where the token is a supervised target."""
    images: List[StoredImage]


class IndexedDatasetWriter:
    """Append samples, then :meth:`finalize` (atomic rename) or :meth:`abort`."""

    def __init__(self, prefix: str, metadata: dict) -> None:
        self.prefix = prefix
        self.metadata = dict(metadata)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._pos = 0
        self._cols = {name: array("q") for name, _ in _SAMPLE_FIELDS + _IMAGE_FIELDS}
        self._image_start = array("q", [0])

    def __len__(self) -> int:
        return len(self._cols["text_len"])

    def _write(self, data: bytes) -> int:
        at = self._pos
        self._bin.write(data)
        pad = _pad8(len(data))
        if pad:
            self._bin.write(b"\0" * pad)
        self._pos += len(data) + pad
        return at

    def add(self, tokens: Sequence[int], loss_mask: Sequence[int],
            images: Sequence[StoredImage] = ()) -> None:
        """Append one sample; images must be in increasing ``pos`` order."""
        tok = np.asarray(tokens, dtype="<i4")
        msk = np.asarray(loss_mask, dtype=np.uint8)
        if tok.shape != msk.shape or tok.ndim != 1:
            raise ValueError(f"tokens {tok.shape} and loss_mask {msk.shape} must be equal 1-D")
        if any(not 0 <= im.pos <= len(tok) for im in images) or \
                any(a.pos > b.pos for a, b in zip(images, images[1:])):
            raise ValueError("image positions must be sorted and within [0, text_len]")
        c = self._cols
        c["record_offset"].append(self._write(tok.tobytes() + msk.tobytes()))
        img_tokens = sum(im.num_tokens for im in images)
        c["text_len"].append(len(tok))
        c["seq_len"].append(len(tok) + img_tokens)
        c["image_tokens"].append(img_tokens)
        for im in images:
            c["image_offset"].append(self._write(im.data))
            c["image_nbytes"].append(len(im.data))
            c["image_h"].append(im.hp)
            c["image_w"].append(im.wp)
            c["image_pos"].append(im.pos)
        self._image_start.append(self._image_start[-1] + len(images))

    def finalize(self) -> None:
        """Write ``.idx``, flush both to stable storage, then rename them to their final names."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        n, m = len(self), len(self._cols["image_h"])
        meta = json.dumps(self.metadata, sort_keys=True).encode()
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(MAGIC + struct.pack("<QQQQ", VERSION, n, m, len(meta)) + meta)
            f.write(b"\0" * _pad8(len(MAGIC) + 32 + len(meta)))
            for name, dtype in _SAMPLE_FIELDS:
                f.write(np.asarray(self._cols[name], dtype=dtype).tobytes())
                f.write(b"\0" * _pad8(n * np.dtype(dtype).itemsize))
            f.write(np.asarray(self._image_start, dtype="<i8").tobytes())
            for name, dtype in _IMAGE_FIELDS:
                f.write(np.asarray(self._cols[name], dtype=dtype).tobytes())
                f.write(b"\0" * _pad8(m * np.dtype(dtype).itemsize))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))

    def abort(self) -> None:
        """Close and delete the temporary files; nothing appears under the final name."""
        self._bin.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def _read_index(path: str) -> Tuple[dict, dict]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw[:8].tobytes() != MAGIC:
        raise ValueError(f"{path}: not an eve_megatron indexed dataset (bad magic)")
    version, n, m, meta_len = struct.unpack("<QQQQ", raw[8:40].tobytes())
    if version != VERSION:
        raise ValueError(f"{path}: format version {version}, this code reads {VERSION}")
    meta = json.loads(raw[40:40 + meta_len].tobytes())
    at = 40 + meta_len + _pad8(40 + meta_len)
    arrays = {}
    layout = [(name, dt, n) for name, dt in _SAMPLE_FIELDS] + [("image_start", "<i8", n + 1)] \
        + [(name, dt, m) for name, dt in _IMAGE_FIELDS]
    for name, dtype, count in layout:
        nbytes = count * np.dtype(dtype).itemsize
        if at + nbytes > len(raw):
            raise ValueError(f"{path}: index truncated while reading {name}")
        arrays[name] = raw[at:at + nbytes].view(dtype)
        at += nbytes + _pad8(nbytes)
    return meta, arrays


class IndexedDataset:
    """Read-only view of ``PREFIX.{idx,bin}``; ``.bin`` is memory-mapped on first access
    (so the object pickles cheaply into DataLoader workers)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(prefix + suffix):
                raise FileNotFoundError(f"indexed dataset file {prefix + suffix} does not exist")
        self.metadata, self._a = _read_index(prefix + ".idx")
        self._bin = None

    def __len__(self) -> int:
        return len(self._a["text_len"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bin"] = None
        return state

    @property
    def seq_lengths(self) -> np.ndarray:
        """int32 ``[n]`` total tokens of each sample (text + image tokens)."""
        return self._a["seq_len"]

    def field(self, name: str) -> np.ndarray:
        """A raw index array by name (``text_len``, ``image_tokens``, ``image_h`` ...)."""
        return self._a[name]

    def get(self, i: int) -> StoredSample:
        """Read sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.prefix} ({len(self)} samples)")
        if self._bin is None:
            self._bin = np.memmap(self.prefix + ".bin", dtype=np.uint8, mode="r")
        a, mm = self._a, self._bin
        off, n = int(a["record_offset"][i]), int(a["text_len"][i])
        tokens = np.frombuffer(mm, dtype="<i4", count=n, offset=off).astype(np.int64)
        mask = np.array(mm[off + 4 * n:off + 5 * n])
        images = []
        for j in range(int(a["image_start"][i]), int(a["image_start"][i + 1])):
            o, nb = int(a["image_offset"][j]), int(a["image_nbytes"][j])
            images.append(StoredImage(mm[o:o + nb].tobytes(), int(a["image_h"][j]),
                                      int(a["image_w"][j]), int(a["image_pos"][j])))
        return StoredSample(tokens=tokens, loss_mask=mask, images=images)
