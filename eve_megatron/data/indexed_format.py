"""The indexed dataset's format: constants, field layouts, records, errors, the index reader.

See :mod:`eve_megatron.data.indexed` (the writer and the reader of samples) for the layout
of ``PREFIX.bin`` / ``PREFIX.idx`` and docs/data.md "On-disk format".
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from eve_megatron.hf.eve_image_rules import image_token_count

MAGIC = b"EVEMMIDX"
VERSION = 2
"""Version of datasets without teacher images (EVEv2)."""
TEACHER_VERSION = 3
"""Version of datasets whose images carry an EVEv1 teacher image."""
READABLE_VERSIONS = (1, 2, 3)
# (name, dtype): sample arrays have n rows (image_start n + 1), image arrays m rows
_SAMPLE_FIELDS = (("record_offset", "<i8"), ("text_len", "<i4"), ("seq_len", "<i4"),
                  ("image_tokens", "<i4"), ("sample_crc", "<u4"))
_V1_SAMPLE_FIELDS = _SAMPLE_FIELDS[:4]
_IMAGE_FIELDS = (("image_offset", "<i8"), ("image_nbytes", "<i8"), ("image_h", "<i4"),
                 ("image_w", "<i4"), ("image_pos", "<i4"))
_TEACHER_FIELDS = (("teacher_offset", "<i8"), ("teacher_nbytes", "<i8"), ("teacher_w", "<i4"),
                   ("teacher_h", "<i4"))


def _pad8(n: int) -> int:
    return (-n) % 8


class CorruptSampleError(ValueError):
    """A sample of an indexed dataset fails its checksum or lies outside its file. One
    message argument, so that a DataLoader worker's error reaches the main process as this
    type (torch rebuilds it from its text)."""


def _damaged(path: str, index: int, reason: str) -> CorruptSampleError:
    return CorruptSampleError(f"{path}: sample {index} is damaged ({reason})")


@dataclass
class StoredImage:
    """One image of a sample: encoded bytes, its block grid and its splice position."""

    data: bytes
    hp: int
    """Height in blocks of the dataset's block side (h'; 32 px for EVEv2, 28 for EVEv1)."""
    wp: int
    """Width in blocks (w')."""
    pos: int
    """Index of the text token the image span is spliced before (== text_len: at the end)."""
    teacher: Optional[bytes] = None
    """EVEv1: encoded base-size image the CLIP teacher sees (version 3 datasets), else None."""
    teacher_w: int = 0
    """Its width in pixels (long side 336)."""
    teacher_h: int = 0
    """Its height in pixels."""

    @property
    def num_tokens(self) -> int:
        """Image tokens of the span (``eve_image_rules.image_token_count``)."""
        return image_token_count(self.hp, self.wp)


@dataclass
class StoredSample:
    """A sample read back from ``.bin``."""

    tokens: np.ndarray
    """int64 ``[text_len]`` text token ids."""
    loss_mask: np.ndarray
    """uint8 ``[text_len]``, 1 where the token is a supervised target."""
    images: List[StoredImage]


def _read_index(path: str) -> Tuple[dict, dict]:
    """``(metadata, arrays)`` of an ``.idx`` file, its CRC checked (version >= 2)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw[:8].tobytes() != MAGIC:
        raise ValueError(f"{path}: not an eve_megatron indexed dataset (bad magic)")
    version, n, m, meta_len = struct.unpack("<QQQQ", raw[8:40].tobytes())
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format version {version}, this code reads {READABLE_VERSIONS}")
    if version >= 2:
        stored = struct.unpack("<Q", raw[-8:].tobytes())[0] if len(raw) >= 48 else None
        if stored != zlib.crc32(raw[:-8]):
            raise ValueError(f"{path}: index is damaged (its CRC-32 does not match); "
                             "re-run preprocessing")
    else:
        warnings.warn(f"{path}: format version 1 has no checksums; samples are read unverified "
                      "(re-run preprocessing to add them)", stacklevel=3)
    try:
        meta = json.loads(raw[40:40 + meta_len].tobytes())
    except ValueError:
        raise ValueError(f"{path}: index metadata is not valid JSON (damaged file?)") from None
    at = 40 + meta_len + _pad8(40 + meta_len)
    arrays = {}
    fields = _SAMPLE_FIELDS if version >= 2 else _V1_SAMPLE_FIELDS
    layout = [(name, dt, n) for name, dt in fields] + [("image_start", "<i8", n + 1)] \
        + [(name, dt, m) for name, dt in _IMAGE_FIELDS + (_TEACHER_FIELDS if version >= 3 else ())]
    for name, dtype, count in layout:
        nbytes = count * np.dtype(dtype).itemsize
        if at + nbytes > len(raw):
            raise ValueError(f"{path}: index truncated while reading {name}")
        arrays[name] = raw[at:at + nbytes].view(dtype)
        at += nbytes + _pad8(nbytes)
    return meta, arrays
