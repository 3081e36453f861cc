"""Offline preprocessing: raw inputs -> tokenised samples + resized images -> indexed dataset.

Bad input never stops the run and is never silent: each skipped sample is counted by
reason and listed (id, origin, reason, detail) in ``PREFIX.skipped.jsonl``. Worker
processes do the image and tokenisation work; the main process writes in input order,
so the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterable, Iterator, List, Optional

from eve_megatron.data.images import ImageConfig, ImageError, prepare_evev1_image, prepare_image
from eve_megatron.data.indexed import IndexedDatasetWriter, StoredImage
from eve_megatron.data.preflight import (PreflightError, check_preprocess, config_problems,
                                         existing_dataset)
from eve_megatron.data.sources import RawError, RawSample, read_inputs
from eve_megatron.data.templates import (TemplateError, normalise_turns, render_caption,
                                         render_conversation, render_text, tokenize_segments)
from eve_megatron.data.tokenizer import Tokenizer, load_tokenizer
from eve_megatron.outputs import OutputLock

SKIP_REASONS = ("bad_json", "bad_tar", "missing_field", "empty_conversation", "bad_conversation",
                "image_count_mismatch", "missing_image", "bad_image", "decompression_bomb",
                "too_long", "no_supervised_tokens")


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs (the CLI maps flags 1:1 onto it)."""

    inputs: List[str]
    """Input files: ``.json`` (LLaVA list), ``.jsonl`` (LLaVA/caption/text lines), ``.tar`` shards."""
    output_prefix: str
    """Writes ``PREFIX.bin``, ``PREFIX.idx`` and ``PREFIX.skipped.jsonl``."""
    tokenizer: str
    """Local HF tokenizer folder or sentencepiece ``.model``."""
    template: str = "plain"
    """One of ``plain``, ``qwen2``, ``chatml`` (EVEv2); ``plain_bos``, ``vicuna_v1`` (EVEv1)."""
    model_family: str = "evev2"
    """``evev2`` (AnyRatio images, 32-px blocks) or ``evev1`` (EVEv1's resize rule, 28-px
    blocks, plus each image's teacher image; ``hf/evev1_image_rules.py``)."""
    evev1_ratio: int = 2
    """EVEv1 only: student size / base size, 2 (672, EVE-7B-v1.0) or 4 (1344, HD)."""
    image_root: str = "."
    """Folder that relative image paths of JSON inputs are resolved against."""
    seq_length: int = 4096
    """Longest allowed sample (text + image tokens); longer ones are skipped or truncated."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """AnyRatio max size, decompression-bomb limit and stored encoding."""
    workers: int = 1
    """Worker processes (0 or 1: work in the main process)."""
    truncate: bool = False
    """Cut the text of too-long samples instead of skipping them (image spans are never cut)."""
    max_bad_fraction: float = 0.05
    """Fail (no dataset written) when skipped / seen exceeds this."""
    system_prompt: Optional[str] = None
    """Override the template's default system prompt."""
    batch_size: int = 256
    """Samples per batch handed to the worker pool (bounds memory)."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""
    overwrite: bool = False
    """Replace a dataset that already exists under ``output_prefix``."""

    def validate(self) -> None:
        """Raise :class:`PreflightError` naming every unusable setting (files are checked by
        :func:`~eve_megatron.data.preflight.check_preprocess`, which ``run_preprocess`` calls)."""
        problems = config_problems(self)
        if problems:
            raise PreflightError(problems)


@dataclass
class Processed:
    """Worker result: a sample ready to write, or a skip (``reason`` set)."""

    sample_id: str
    origin: str
    tokens: Optional[List[int]] = None
    loss_mask: Optional[List[int]] = None
    images: Optional[List[StoredImage]] = None
    truncated: bool = False
    reason: Optional[str] = None
    detail: str = ""


def _read_image(ref, cfg: PreprocessConfig) -> bytes:
    if isinstance(ref, bytes):
        return ref
    path = ref if os.path.isabs(ref) else os.path.join(cfg.image_root, ref)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageError("missing_image", f"{path}: {exc.strerror or exc}") from None


def _render(raw: RawSample, cfg: PreprocessConfig):
    n = len(raw.images)
    if raw.turns is not None:
        return render_conversation(normalise_turns(raw.turns), n, cfg.template, cfg.system_prompt)
    if raw.caption is not None:
        return render_caption(raw.caption, n, cfg.template, cfg.system_prompt)
    return render_text(raw.text, cfg.template)


def _fit(out: Processed, cfg: PreprocessConfig) -> None:
    """Apply the --seq-length limit (skip, or truncate the text) in place."""
    image_tokens = sum(im.num_tokens for im in out.images)
    total = len(out.tokens) + image_tokens
    if total <= cfg.seq_length:
        return
    keep = cfg.seq_length - image_tokens
    if not cfg.truncate or keep < max([im.pos for im in out.images], default=0):
        out.reason = "too_long"
        out.detail = f"{total} tokens > --seq-length {cfg.seq_length}"
        return
    out.tokens, out.loss_mask, out.truncated = out.tokens[:keep], out.loss_mask[:keep], True


def _stored_image(data: bytes, cfg: PreprocessConfig) -> StoredImage:
    """One image prepared by its family's rule (position set by the caller)."""
    if cfg.model_family == "evev1":
        student, hp, wp, teacher, tw, th = prepare_evev1_image(data, cfg.image, cfg.evev1_ratio)
        return StoredImage(student, hp, wp, 0, teacher, tw, th)
    return StoredImage(*prepare_image(data, cfg.image), 0)


def process_raw(raw, cfg: PreprocessConfig, tok: Tokenizer) -> Processed:
    """Turn one raw sample into a :class:`Processed` (never raises for bad data)."""
    if isinstance(raw, RawError):
        return Processed(raw.sample_id, raw.origin, reason=raw.reason, detail=raw.detail)
    out = Processed(raw.sample_id, raw.origin)
    try:
        tokens, mask, positions = tokenize_segments(_render(raw, cfg), tok)
        images = [_stored_image(_read_image(ref, cfg), cfg) for ref in raw.images]
    except (TemplateError, ImageError) as exc:
        out.reason, out.detail = exc.reason, exc.detail
        return out
    out.tokens, out.loss_mask = tokens, mask
    for im, pos in zip(images, positions):
        im.pos = pos
    out.images = images
    _fit(out, cfg)
    if out.reason is None and not any(out.loss_mask):
        out.reason, out.detail = "no_supervised_tokens", "no token carries loss"
    return out


_WORKER = {}


def _init_worker(cfg: PreprocessConfig) -> None:
    _WORKER["cfg"], _WORKER["tok"] = cfg, load_tokenizer(cfg.tokenizer)


def _work(raw) -> Processed:
    return process_raw(raw, _WORKER["cfg"], _WORKER["tok"])


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _results(cfg: PreprocessConfig, tok: Tokenizer) -> Iterator[List[Processed]]:
    """Processed batches in input order; at most two batches in flight in the pool."""
    raws = read_inputs(cfg.inputs)
    if cfg.workers <= 1:
        for batch in _batches(raws, cfg.batch_size):
            yield [process_raw(r, cfg, tok) for r in batch]
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending = deque()
        for batch in _batches(raws, cfg.batch_size):
            chunk = max(1, min(8, len(batch) // (4 * cfg.workers)))
            pending.append(pool.map_async(_work, batch, chunksize=chunk))
            if len(pending) >= 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _metadata(cfg: PreprocessConfig, tok: Tokenizer) -> dict:
    """The dataset's metadata; EVEv2's keys exactly as before, EVEv1 adds its own."""
    meta = {"format": "eve_megatron indexed dataset", "template": cfg.template,
            "tokenizer": os.path.abspath(cfg.tokenizer), "vocab_size": tok.vocab_size,
            "seq_length": cfg.seq_length, "image": asdict(cfg.image), "truncate": cfg.truncate,
            "system_prompt": cfg.system_prompt, "inputs": [os.path.abspath(p) for p in cfg.inputs]}
    if cfg.model_family == "evev1":
        from eve_megatron.hf import evev1_image_rules as evev1

        meta["model_family"] = "evev1"
        meta["image"].update(rule="evev1", block=evev1.BLOCK, evev1_ratio=cfg.evev1_ratio,
                             base_size=evev1.BASE_SIZE, teacher_patch=evev1.TEACHER_PATCH)
        meta["image"].pop("max_size")  # EVEv1's sizes follow the base size, not max_size
    return meta


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run preprocessing and return the summary dict (also what the CLI prints).

    Everything the run needs is checked first (:func:`check_preprocess`): every problem is
    reported at once, in one :class:`PreflightError`, before any sample is read or any file
    is created. The dataset appears under its final name only if the run completes and the
    bad fraction is within ``cfg.max_bad_fraction``; the skip report is always written. One
    writer per prefix (an OS lock); an existing dataset is replaced only with ``overwrite``.
    """
    tok = check_preprocess(cfg)
    with OutputLock(cfg.output_prefix, "dataset prefix"):
        exists = existing_dataset(cfg.output_prefix)
        if exists and not cfg.overwrite:  # written since the check, by a writer now gone
            raise ValueError(exists)
        return _run_locked(cfg, tok)


def _run_locked(cfg: PreprocessConfig, tok: Tokenizer) -> dict:
    from tqdm import tqdm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    writer = IndexedDatasetWriter(cfg.output_prefix, _metadata(cfg, tok),
                                  teacher=cfg.model_family == "evev1")
    report_path = cfg.output_prefix + ".skipped.jsonl"
    counts, truncated, n_tokens, n_image_tokens = Counter(), 0, 0, 0
    try:
        with open(report_path + ".tmp", "w", encoding="utf-8") as report, \
                tqdm(desc="preprocess", unit="sample", file=sys.stderr,
                     disable=not cfg.progress) as bar:
            for batch in _results(cfg, tok):
                for r in batch:
                    if r.reason is not None:
                        counts[r.reason] += 1
                        report.write(json.dumps({"id": r.sample_id, "origin": r.origin,
                                                 "reason": r.reason, "detail": r.detail}) + "\n")
                        continue
                    writer.add(r.tokens, r.loss_mask, r.images)
                    truncated += r.truncated
                    n_tokens += len(r.tokens)
                    n_image_tokens += sum(im.num_tokens for im in r.images)
                bar.update(len(batch))
                bar.set_postfix(written=len(writer), skipped=sum(counts.values()))
    except BaseException:
        writer.abort()
        if os.path.exists(report_path + ".tmp"):
            os.remove(report_path + ".tmp")
        raise
    os.replace(report_path + ".tmp", report_path)
    written, skipped = len(writer), sum(counts.values())
    bad_fraction = skipped / max(1, written + skipped)
    failed = written == 0 or bad_fraction > cfg.max_bad_fraction
    writer.abort() if failed else writer.finalize()
    return {"written": written, "skipped": skipped, "skipped_by_reason": dict(sorted(counts.items())),
            "truncated": truncated, "bad_fraction": round(bad_fraction, 6), "failed": failed,
            "text_tokens": n_tokens, "image_tokens": n_image_tokens,
            "output": None if failed else cfg.output_prefix, "report": report_path,
            "seconds": round(time.time() - start, 3)}
