"""Input readers: LLaVA JSON/JSONL, caption JSONL, WebDataset tar shards, text JSONL.

Every reader yields :class:`RawSample` or, for input it cannot read, :class:`RawError`
(never raises for bad data), so one bad line never stops a run.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
INPUT_FORMATS = ((".json", "json"), (".jsonl", "jsonl"), (".tar", "tar"), (".tar.gz", "tar"),
                 (".tgz", "tar"))
"""Known input suffixes and the reader each selects (the format follows the extension)."""
KNOWN_SUFFIXES = ", ".join(s for s, _ in INPUT_FORMATS)


def input_format(path: str) -> Optional[str]:
    """``"json"``, ``"jsonl"`` or ``"tar"`` for a known input suffix, else None."""
    return next((kind for suffix, kind in INPUT_FORMATS if path.endswith(suffix)), None)


@dataclass
class RawSample:
    """One input sample before tokenisation; exactly one of turns/caption/text is set."""

    sample_id: str
    origin: str
    """Where it came from (``file:line`` or ``shard.tar:key``), for reports."""
    images: List[Union[str, bytes]] = field(default_factory=list)
    """Image paths relative to ``--image-root``, or encoded bytes (tar shards)."""
    turns: Optional[list] = None
    """LLaVA ``conversations`` as given (validated by the template)."""
    caption: Optional[str] = None
    text: Optional[str] = None


@dataclass
class RawError:
    """Input that could not even be parsed into a sample."""

    sample_id: str
    origin: str
    reason: str
    detail: str


Raw = Union[RawSample, RawError]


def record_to_raw(rec, sample_id: str, origin: str) -> Raw:
    """Interpret one JSON record (LLaVA, caption or text)."""
    if not isinstance(rec, dict):
        return RawError(sample_id, origin, "bad_json", f"record is {type(rec).__name__}, not an object")
    sample_id = str(rec.get("id", sample_id))
    image = rec.get("image")
    images = [] if image is None else (list(image) if isinstance(image, list) else [image])
    if not all(isinstance(p, str) and p for p in images):
        return RawError(sample_id, origin, "missing_field", "'image' must be a path or list of paths")
    if "conversations" in rec:
        return RawSample(sample_id, origin, images, turns=rec["conversations"])
    if "caption" in rec:
        if not images:
            return RawError(sample_id, origin, "missing_field", "caption record without 'image'")
        if not isinstance(rec["caption"], str):
            return RawError(sample_id, origin, "missing_field", "'caption' is not text")
        return RawSample(sample_id, origin, images, caption=rec["caption"])
    if "text" in rec and isinstance(rec["text"], str) and not images:
        return RawSample(sample_id, origin, text=rec["text"])
    return RawError(sample_id, origin, "missing_field",
                    "record has none of 'conversations', 'caption' (+'image'), 'text'")


def read_json(path: str) -> Iterator[Raw]:
    """A LLaVA-style JSON file: one list of records."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        yield RawError(name, path, "bad_json", f"cannot read JSON file: {exc}")
        return
    if not isinstance(data, list):
        yield RawError(name, path, "bad_json", "top level of a .json input must be a list")
        return
    for k, rec in enumerate(data):
        yield record_to_raw(rec, f"{name}[{k}]", f"{path}[{k}]")


def read_jsonl(path: str) -> Iterator[Raw]:
    """One JSON record per line; blank lines are ignored."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                yield RawError(f"{name}:{lineno}", origin, "bad_json", f"line is not JSON: {exc}")
                continue
            yield record_to_raw(rec, f"{name}:{lineno}", origin)


def _split_key(member: str) -> Tuple[str, str]:
    base = os.path.basename(member)
    stem, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(member), stem), ext.lower()


def _group_to_raw(key: str, files: dict, path: str) -> Raw:
    origin = f"{path}:{key}"
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        return RawError(key, origin, "missing_image", f"no image member for key (has {sorted(files)})")
    if "txt" not in files:
        return RawError(key, origin, "missing_field", "no .txt caption member for key")
    caption = files["txt"].decode("utf-8", errors="replace")
    return RawSample(key, origin, [files[image_ext]], caption=caption)


def read_tar(path: str) -> Iterator[Raw]:
    """A WebDataset shard: members ``KEY.jpg`` (or png/webp...) + ``KEY.txt``, grouped by key."""
    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and key is not None:
                    yield _group_to_raw(key, files, path)
                    files = {}
                key = k
                files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawError(key or os.path.basename(path), path, "bad_tar",
                       f"shard unreadable after key {key!r}: {exc}")
        return
    if key is not None:
        yield _group_to_raw(key, files, path)


def read_inputs(paths: List[str]) -> Iterator[Raw]:
    """All samples of all inputs, in order. The format follows the extension
    (:func:`input_format`); ``preflight.check_preprocess`` checks every input up front."""
    readers = {"json": read_json, "jsonl": read_jsonl, "tar": read_tar}
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist")
        kind = input_format(path)
        if kind is None:
            raise ValueError(f"input {path}: unknown format (use {KNOWN_SUFFIXES})")
        yield from readers[kind](path)
