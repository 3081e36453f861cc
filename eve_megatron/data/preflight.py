"""Checks made before any preprocessing work: every problem at once, nothing written.

A preprocessing run can take hours; a mistyped path found in the last input wastes them.
:func:`check_preprocess` looks at everything the run will need before the first sample is
read or any output (or lock) file is created: the settings, each ``--input`` (exists, is a
readable file, has a known format whose first bytes look right), ``--image-root``, the
tokenizer (loads, has the template's special tokens) and ``--output-prefix`` (names files in
a folder that is, or can be, created and written; no dataset there unless ``--overwrite``).
Every problem found is one line of one :class:`PreflightError`.
"""

from __future__ import annotations

import os
import tarfile
from typing import TYPE_CHECKING, List, Optional, Tuple

from eve_megatron.data.sources import KNOWN_SUFFIXES, input_format
from eve_megatron.data.templates import (FAMILIES, TEMPLATE_SPECS, TEMPLATES, family_templates,
                                         required_special_tokens)
from eve_megatron.data.tokenizer import Tokenizer, load_tokenizer
from eve_megatron.hf.evev1_image_rules import RATIOS

if TYPE_CHECKING:  # pragma: no cover
    from eve_megatron.data.preprocess import PreprocessConfig

SNIFF_BYTES = 4096
"""How much of each input is read up front (its first bytes only, whatever its size)."""


class PreflightError(ValueError):
    """Every problem found before preprocessing; ``problems`` holds one line each."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found before any work (nothing was written):"
        super().__init__("\n".join([head] + [f"  {p}" for p in self.problems]))


def check_tokenizer(tok: Tokenizer, template: str) -> None:
    """The template's special tokens must each be one token of the vocabulary."""
    for special in required_special_tokens(template):
        if tok.token_id(special) is None:
            raise ValueError(f"tokenizer {tok.path} has no single token for {special!r}, "
                             f"which the {template!r} template needs")


def config_problems(cfg: "PreprocessConfig") -> List[str]:
    """Problems of the settings alone (no file is looked at)."""
    out = []
    if not cfg.inputs:
        out.append("at least one --input is needed")
    if cfg.template not in TEMPLATES:
        out.append(f"--template {cfg.template!r} is not one of {TEMPLATES}")
    if cfg.model_family not in FAMILIES:
        out.append(f"--model-family {cfg.model_family!r} is not one of {FAMILIES}")
    elif cfg.template in TEMPLATES and TEMPLATE_SPECS[cfg.template].family != cfg.model_family:
        out.append(f"--template {cfg.template} is {TEMPLATE_SPECS[cfg.template].family}'s; "
                   f"--model-family {cfg.model_family} uses "
                   f"{' or '.join(family_templates(cfg.model_family))}")
    if cfg.evev1_ratio not in RATIOS:
        out.append(f"--evev1-ratio must be one of {RATIOS} (672 or 1344 pixels), "
                   f"got {cfg.evev1_ratio}")
    if cfg.seq_length < 2:
        out.append(f"--seq-length must be >= 2, got {cfg.seq_length}")
    if cfg.workers < 0 or cfg.batch_size < 1:
        out.append("--workers must be >= 0 and batch_size >= 1")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        out.append(f"--max-bad-fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    return out


def _sniff(path: str, kind: str, head: bytes) -> Optional[str]:
    """Why the first bytes of a readable input do not fit its format, or None."""
    if not head:
        return "is empty"
    if kind in ("json", "jsonl") and b"\0" in head:
        return f"holds binary data, not JSON text (a .{kind} input)"
    if kind == "json" and not head.lstrip().startswith(b"["):
        return ("is not a JSON list (a .json input holds one list of records; "
                "one record per line is a .jsonl input)")
    if kind == "tar":
        try:
            ok = tarfile.is_tarfile(path)
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        if not ok:
            return "is not a tar archive"
    return None


def input_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a preprocessing input, or None."""
    if not os.path.exists(path):
        return "does not exist" + (" (a broken link)" if os.path.islink(path) else "")
    if os.path.isdir(path):
        return "is a folder, not an input file"
    kind = input_format(path)
    if kind is None:
        return f"unknown format (use {KNOWN_SUFFIXES})"
    if not os.path.isfile(path):
        return "is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return _sniff(path, kind, head)


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def existing_dataset(prefix: str) -> Optional[str]:
    """The message for a dataset already under ``prefix`` (refused without ``--overwrite``)."""
    existing = [prefix + s for s in (".bin", ".idx") if os.path.exists(prefix + s)]
    if not existing:
        return None
    return (f"a dataset already exists at {existing[0]}: pass --overwrite to replace it, "
            "or choose another --output-prefix")


def output_problems(prefix: str, overwrite: bool) -> List[str]:
    """Problems of ``--output-prefix``: a folder name, an unwritable place, a dataset there."""
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        return [f"--output-prefix {prefix!r} must name files (PREFIX.bin, PREFIX.idx), "
                "not a folder"]
    folder = os.path.dirname(os.path.abspath(prefix))
    base = _nearest_existing(folder)
    if not os.path.isdir(base):
        return [f"--output-prefix {prefix}: {base} is a file, not a folder"]
    if not os.access(base, os.W_OK | os.X_OK):
        return [f"--output-prefix {prefix}: folder {base} is not writable"]
    exists = existing_dataset(prefix)
    return [exists] if exists and not overwrite else []


def tokenizer_problem(cfg: "PreprocessConfig") -> Tuple[Optional[Tokenizer], Optional[str]]:
    """``(tokenizer, None)``, or ``(None, why it cannot serve this run)``."""
    try:
        tok = load_tokenizer(cfg.tokenizer)
        if cfg.template in TEMPLATES:
            check_tokenizer(tok, cfg.template)
    except Exception as exc:  # tokenizers, sentencepiece and transformers raise many kinds
        text = " ".join(str(exc).split()) or type(exc).__name__
        if cfg.tokenizer not in text:
            text = f"{cfg.tokenizer}: {text}"
        return None, f"--tokenizer: {text}"
    return tok, None


def check_preprocess(cfg: "PreprocessConfig") -> Tokenizer:
    """Check everything a run needs; return the loaded tokenizer or raise one
    :class:`PreflightError` naming every problem (file and reason, one line each)."""
    problems = config_problems(cfg)
    for path in cfg.inputs:
        why = input_problem(path)
        if why is not None:
            problems.append(f"--input {path}: {why}")
    if not os.path.isdir(cfg.image_root):
        problems.append(f"--image-root {cfg.image_root} is not a directory")
    elif not os.access(cfg.image_root, os.R_OK | os.X_OK):
        problems.append(f"--image-root {cfg.image_root} is not readable")
    tok, why = tokenizer_problem(cfg)
    if why is not None:
        problems.append(why)
    problems += output_problems(cfg.output_prefix, cfg.overwrite)
    if problems:
        raise PreflightError(problems)
    return tok
