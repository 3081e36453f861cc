"""The on-disk indexed dataset: ``PREFIX.bin`` (records) + ``PREFIX.idx`` (index).

``.bin`` holds one record per sample: its text tokens (int32), its loss mask (uint8),
then the encoded bytes of each of its images, padded to 8 bytes. ``.idx`` (little
endian) is ``MAGIC``, version, sample count, image count, a JSON metadata blob, then
8-byte-aligned arrays (see ``_SAMPLE_FIELDS`` / ``_IMAGE_FIELDS``, and ``_TEACHER_FIELDS`` in
version 3), then (version >= 2) the CRC-32 of everything before it. Per-sample lengths and
image sizes live in ``.idx`` so that packing never opens ``.bin``.

Integrity (version >= 2): ``sample_crc`` is the CRC-32 of a sample's bytes (tokens, mask,
then each image's encoded bytes, padding excluded), checked on every read: a damaged or
truncated sample raises :class:`CorruptSampleError` naming the file and the sample
index. A damaged ``.idx`` fails its own CRC when opened. Version 1 files (no checksums)
are still read, unverified.

Version 3 (EVEv1 datasets, written with ``teacher=True``) is version 2 plus, per image, the
teacher's base-size image (encoded bytes stored right after the image's own bytes, its
width and height in pixels); the sample CRC covers them too (per image: its bytes, then its
teacher's). Datasets without teacher images are still written as version 2, byte for byte
as before.

Both files are written under ``*.tmp`` names and renamed by :meth:`IndexedDatasetWriter.finalize`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from typing import Sequence

import numpy as np

from eve_megatron.data.indexed_format import (  # noqa: F401  (the format's names, re-exported)
    _IMAGE_FIELDS, _SAMPLE_FIELDS, _TEACHER_FIELDS, MAGIC, READABLE_VERSIONS, TEACHER_VERSION,
    VERSION, CorruptSampleError, StoredImage, StoredSample, _damaged, _pad8, _read_index)
from eve_megatron.outputs import fsync_dir


class IndexedDatasetWriter:
    """Append samples, then :meth:`finalize` (atomic rename) or :meth:`abort`."""

    def __init__(self, prefix: str, metadata: dict, teacher: bool = False) -> None:
        self.prefix = prefix
        self.metadata = dict(metadata)
        self.teacher = teacher
        """Every image carries a teacher image (written as version 3)."""
        self._image_fields = _IMAGE_FIELDS + (_TEACHER_FIELDS if teacher else ())
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._pos = 0
        self._cols = {name: array("q") for name, _ in _SAMPLE_FIELDS + self._image_fields}
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
        if any((im.teacher is not None) != self.teacher for im in images):
            raise ValueError(f"every image must {'' if self.teacher else 'not '}carry a teacher "
                             f"image in this dataset (teacher={self.teacher})")
        c = self._cols
        record = tok.tobytes() + msk.tobytes()
        crc = zlib.crc32(record)
        c["record_offset"].append(self._write(record))
        img_tokens = sum(im.num_tokens for im in images)
        c["text_len"].append(len(tok))
        c["seq_len"].append(len(tok) + img_tokens)
        c["image_tokens"].append(img_tokens)
        for im in images:
            crc = zlib.crc32(im.data, crc)
            c["image_offset"].append(self._write(im.data))
            c["image_nbytes"].append(len(im.data))
            c["image_h"].append(im.hp)
            c["image_w"].append(im.wp)
            c["image_pos"].append(im.pos)
            if self.teacher:
                crc = zlib.crc32(im.teacher, crc)
                c["teacher_offset"].append(self._write(im.teacher))
                c["teacher_nbytes"].append(len(im.teacher))
                c["teacher_w"].append(im.teacher_w)
                c["teacher_h"].append(im.teacher_h)
        self._image_start.append(self._image_start[-1] + len(images))
        c["sample_crc"].append(crc)

    def finalize(self) -> None:
        """Write ``.idx``, flush both to stable storage, then rename them to their final names."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        n, m = len(self), len(self._cols["image_h"])
        meta = json.dumps(self.metadata, sort_keys=True).encode()
        version = TEACHER_VERSION if self.teacher else VERSION
        parts = [MAGIC + struct.pack("<QQQQ", version, n, m, len(meta)) + meta,
                 b"\0" * _pad8(len(MAGIC) + 32 + len(meta))]
        for name, dtype in _SAMPLE_FIELDS:
            parts += [np.asarray(self._cols[name], dtype=dtype).tobytes(),
                      b"\0" * _pad8(n * np.dtype(dtype).itemsize)]
        parts.append(np.asarray(self._image_start, dtype="<i8").tobytes())
        for name, dtype in self._image_fields:
            parts += [np.asarray(self._cols[name], dtype=dtype).tobytes(),
                      b"\0" * _pad8(m * np.dtype(dtype).itemsize)]
        crc = 0
        with open(self.prefix + ".idx.tmp", "wb") as f:
            for part in parts:
                crc = zlib.crc32(part, crc)
                f.write(part)
            f.write(struct.pack("<Q", crc))
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


class IndexedDataset:
    """Read-only view of ``PREFIX.{idx,bin}``; ``.bin`` is memory-mapped on first access
    (so the object pickles cheaply into DataLoader workers)."""

    def __init__(self, prefix: str, verify: bool = True) -> None:
        self.prefix = prefix
        self.verify = verify
        """Check each sample read against its stored checksum (when the file has them)."""
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

    @property
    def has_checksums(self) -> bool:
        """Whether the files carry per-sample checksums (format version >= 2)."""
        return "sample_crc" in self._a

    @property
    def has_teacher(self) -> bool:
        """Whether every image carries an EVEv1 teacher image (format version 3)."""
        return "teacher_offset" in self._a

    @property
    def block(self) -> int:
        """Pixels per side of an image block (``image.block`` of the metadata; 32 when absent:
        datasets written before EVEv1 are EVEv2's)."""
        return int((self.metadata.get("image") or {}).get("block", 32))

    def get(self, i: int) -> StoredSample:
        """Read sample ``i``; :class:`CorruptSampleError` when its bytes fail the checksum or
        its record lies outside ``.bin``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.prefix} ({len(self)} samples)")
        if self._bin is None:
            self._bin = np.memmap(self.prefix + ".bin", dtype=np.uint8, mode="r")
        a, mm = self._a, self._bin
        off, n = int(a["record_offset"][i]), int(a["text_len"][i])
        js = range(int(a["image_start"][i]), int(a["image_start"][i + 1]))
        spans = [(off, 5 * n)]
        for j in js:  # the CRC order: each image's bytes, then its teacher's
            spans.append((int(a["image_offset"][j]), int(a["image_nbytes"][j])))
            if self.has_teacher:
                spans.append((int(a["teacher_offset"][j]), int(a["teacher_nbytes"][j])))
        if any(o < 0 or nb < 0 or o + nb > len(mm) for o, nb in spans):
            raise _damaged(self.prefix + ".bin", i, "its record lies past the end of the file: "
                           "truncated .bin or damaged .idx")
        record = mm[off:off + 5 * n].tobytes()
        datas = [mm[o:o + nb].tobytes() for o, nb in spans[1:]]
        if self.verify and self.has_checksums:
            crc = zlib.crc32(record)
            for data in datas:
                crc = zlib.crc32(data, crc)
            if crc != int(a["sample_crc"][i]):
                raise _damaged(self.prefix + ".bin", i, f"CRC-32 {crc:08x}, the index recorded "
                               f"{int(a['sample_crc'][i]):08x}")
        tokens = np.frombuffer(record, dtype="<i4", count=n).astype(np.int64)
        mask = np.frombuffer(record, dtype=np.uint8, offset=4 * n).copy()
        step = 2 if self.has_teacher else 1
        images = []
        for k, j in enumerate(js):
            im = StoredImage(datas[step * k], int(a["image_h"][j]), int(a["image_w"][j]),
                             int(a["image_pos"][j]))
            if self.has_teacher:
                im.teacher = datas[step * k + 1]
                im.teacher_w, im.teacher_h = int(a["teacher_w"][j]), int(a["teacher_h"][j])
            images.append(im)
        return StoredSample(tokens=tokens, loss_mask=mask, images=images)
