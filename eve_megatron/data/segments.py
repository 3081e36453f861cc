"""Rendered samples as segments, and their tokenisation with an exact loss mask.

A rendered sample is a list of :class:`Segment`: text pieces with a ``supervised`` flag,
special tokens and image slots. Two tokenisations, chosen by the template per segment:

- on its own (EVEv2's templates): each text piece is one ``encode`` call, so the mask is
  exact by construction;
- joined (``join=True``; EVEv1's templates): a run of text pieces between images and
  special tokens is encoded as ONE text, as the official LLaVA/EVEv1 code tokenises a whole
  prompt (a sentencepiece dummy prefix only at the start of the run, merges across piece
  borders); a piece's tokens are those between ``len(encode(text before it))`` and
  ``len(encode(text through it))``, the count rule of LLaVA's ``preprocess_v1``.

A special segment (``special=True``, e.g. ``<s>``, ``</s>``) is one id from
``Tokenizer.token_id``, never looked for in text (the slow Llama tokenizer's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from eve_megatron.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Segment:
    """A text piece (``image < 0``), a special token (``special``) or the slot of image
    number ``image``."""

    text: str = ""
    supervised: bool = False
    image: int = -1
    special: bool = False
    """``text`` names one special token of the vocabulary."""
    join: bool = False
    """Tokenised together with the text piece(s) right before it (joined tokenisation)."""

    @property
    def is_text(self) -> bool:
        """A plain text piece (not an image slot, not a special token)."""
        return self.image < 0 and not self.special


def _encode_run(run: Sequence[Segment], tokenizer: Tokenizer, tokens: List[int],
                mask: List[int]) -> None:
    """Encode joined text pieces as one text; each piece's mask by prefix token counts."""
    text = "".join(s.text for s in run)
    ids = tokenizer.encode(text)
    start, prefix = 0, ""
    for k, seg in enumerate(run):
        prefix += seg.text
        end = len(ids) if k == len(run) - 1 else len(tokenizer.encode(prefix))
        end = min(max(end, start), len(ids))
        mask.extend([int(seg.supervised)] * (end - start))
        start = end
    tokens.extend(ids)


def _special_id(seg: Segment, tokenizer: Tokenizer) -> int:
    tid = tokenizer.token_id(seg.text)
    if tid is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no single token for {seg.text!r}")
    return tid


def tokenize_segments(segments: Sequence[Segment], tokenizer: Tokenizer
                      ) -> Tuple[List[int], List[int], List[int]]:
    """Tokens, per-token loss mask (1 = supervised target) and, per image, the text-token
    index its span is spliced before."""
    tokens: List[int] = []
    mask: List[int] = []
    image_pos: List[int] = []
    k = 0
    while k < len(segments):
        seg = segments[k]
        if seg.image >= 0:
            image_pos.append(len(tokens))
        elif seg.special:
            tokens.append(_special_id(seg, tokenizer))
            mask.append(int(seg.supervised))
        else:
            end = k + 1
            while end < len(segments) and segments[end].is_text and segments[end].join:
                end += 1
            _encode_run(segments[k:end], tokenizer, tokens, mask)
            k = end
            continue
        k += 1
    return tokens, mask, image_pos
