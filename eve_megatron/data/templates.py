"""Prompt templates and their loss masks (reference §4; EVEv1: evev1_reference.md §3-4).

A rendered sample is a list of :class:`~eve_megatron.data.segments.Segment` (text pieces
with a ``supervised`` flag, special tokens, image slots), tokenised by
:func:`~eve_megatron.data.segments.tokenize_segments`. ``<image>`` markers are removed from
their message and put at its front, one ``<image>\\n`` per image, in order. Each template
belongs to a model family (:data:`TEMPLATE_SPECS`).

EVEv2 (each text piece tokenised on its own):

- ``plain`` (captions): ``<image>`` + caption + ``\\n``; loss on caption and newline.
  For conversations the user's text is dropped (only its images stay) and every
  answer is followed by ``\\n`` and supervised.
- ``qwen2`` (the release's, NOT ChatML): ``{system} USER: <image>\\n{q1} ASSISTANT: {a1}<|im_end|>USER: ...``;
  loss on `` {a}<|im_end|>``, everything up to and including `` ASSISTANT:`` masked.
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n``; loss on the answer and its ``<|im_end|>``.

EVEv1 (BOS ``<s>`` first and masked; text between images and special tokens tokenised as
one piece, as the official code does, the mask by LLaVA's prefix-count rule):

- ``plain_bos``: ``<s><image>`` + caption + ``\\n``; loss on caption and newline, no EOS
  (the official ``preprocess_plain``).
- ``vicuna_v1`` (``conv_vicuna_v1``, LLaVA ``preprocess_v1``):
  ``<s>{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``;
  everything through `` ASSISTANT:`` masked, `` {a}`` and ``</s>`` supervised.

Text-only documents (a ``text`` field) are always plain: text + ``\\n``, all supervised
(after a masked ``<s>`` for EVEv1's templates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from eve_megatron.data.segments import Segment, tokenize_segments  # noqa: F401
from eve_megatron.hf.eve_prompt import IM_END, IM_START, IMAGE_TOKEN, QWEN2_SYSTEM  # noqa: F401

CHATML_SYSTEM = "You are a helpful assistant."
LLAMA_BOS, LLAMA_EOS = "<s>", "</s>"
VICUNA_V1_SYSTEM = QWEN2_SYSTEM
"""``conv_vicuna_v1``'s system prompt: the same text as the EVEv2 release's (both LLaVA's)."""


@dataclass(frozen=True)
class TemplateSpec:
    """What a template needs and how it tokenises."""

    family: str
    """Model family it belongs to (``evev2`` or ``evev1``)."""
    specials: Tuple[str, ...]
    """Special tokens that must be single tokens of the tokenizer."""
    bos: Optional[str] = None
    """Token put first in every sample (masked), or None."""
    joined: bool = False
    """Text between images and special tokens is tokenised as one piece (``Segment.join``)."""


TEMPLATE_SPECS = {
    "plain": TemplateSpec("evev2", ()),
    "qwen2": TemplateSpec("evev2", (IM_END,)),
    "chatml": TemplateSpec("evev2", (IM_START, IM_END)),
    "plain_bos": TemplateSpec("evev1", (LLAMA_BOS,), LLAMA_BOS, True),
    "vicuna_v1": TemplateSpec("evev1", (LLAMA_BOS, LLAMA_EOS), LLAMA_BOS, True),
}
TEMPLATES = tuple(TEMPLATE_SPECS)
FAMILIES = ("evev2", "evev1")
"""Model families whose data preprocessing knows (images and templates differ)."""


def family_templates(family: str) -> Tuple[str, ...]:
    """Templates of a model family."""
    return tuple(n for n, spec in TEMPLATE_SPECS.items() if spec.family == family)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class TemplateError(ValueError):
    """A sample the template cannot render; ``reason`` is a short tag for reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def required_special_tokens(template: str) -> Tuple[str, ...]:
    """Special tokens that must be single tokens of the tokenizer for ``template``."""
    return TEMPLATE_SPECS[template].specials


def normalise_turns(conversations) -> List[Tuple[str, str]]:
    """LLaVA ``conversations`` -> ``[(role, text)]`` with roles user/assistant/system."""
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError("empty_conversation", "conversations is empty or not a list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise TemplateError("missing_field", f"conversation turn {k} lacks 'from'/'value'")
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None or not isinstance(turn["value"], str):
            raise TemplateError("bad_conversation", f"turn {k}: unknown role {turn['from']!r} "
                                "or non-text value")
        turns.append((role, turn["value"]))
    return turns


def _pairs(turns: Sequence[Tuple[str, str]]):
    """Split off an optional system turn, then (user, assistant) pairs."""
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if turns and turns[-1][0] == "user":
        turns = turns[:-1]  # a trailing question without answer carries no loss
    if not turns:
        raise TemplateError("empty_conversation", "no user/assistant exchange")
    pairs = []
    for k in range(0, len(turns), 2):
        chunk = turns[k:k + 2]
        if len(chunk) != 2 or chunk[0][0] != "user" or chunk[1][0] != "assistant":
            raise TemplateError("bad_conversation", f"turns must alternate user/assistant "
                                f"(problem at turn {k})")
        pairs.append((chunk[0][1], chunk[1][1]))
    return system, pairs


def _place_images(pairs, n_images: int):
    """Per user message: (number of images it holds, text without markers)."""
    counts = [q.count(IMAGE_TOKEN) for q, _ in pairs]
    if any(IMAGE_TOKEN in a for _, a in pairs):
        raise TemplateError("bad_conversation", "<image> inside an assistant answer")
    if sum(counts) == 0 and n_images:
        counts[0] = n_images  # no marker: the images go before the first question
    if sum(counts) != n_images:
        raise TemplateError("image_count_mismatch",
                            f"{sum(counts)} <image> markers for {n_images} images")
    return [(c, q.replace(IMAGE_TOKEN, "").strip() if c else q) for c, (q, _) in zip(counts, pairs)]


class _Builder:
    def __init__(self, joined: bool = False) -> None:
        self.segments: List[Segment] = []
        self.next_image = 0
        self.joined = joined

    def text(self, text: str, supervised: bool = False) -> None:
        if not text:
            return
        last = self.segments[-1] if self.segments else None
        if last is not None and last.is_text and last.supervised == supervised:
            self.segments[-1] = Segment(last.text + text, supervised, join=last.join)
        else:
            join = self.joined and last is not None and last.is_text
            self.segments.append(Segment(text, supervised, join=join))

    def special(self, token: str, supervised: bool = False) -> None:
        self.segments.append(Segment(token, supervised, special=True))

    def images(self, count: int, newline: bool) -> None:
        for _ in range(count):
            self.segments.append(Segment(image=self.next_image))
            self.next_image += 1
            if newline:
                self.text("\n")


def render_conversation(turns: Sequence[Tuple[str, str]], n_images: int, template: str,
                        system_prompt: Optional[str] = None) -> List[Segment]:
    """Render normalised turns with ``template`` into segments (images in order)."""
    if template not in TEMPLATE_SPECS:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    system, pairs = _pairs(turns)
    users = _place_images(pairs, n_images)
    spec = TEMPLATE_SPECS[template]
    out = _Builder(spec.joined)
    if spec.bos:
        out.special(spec.bos)
    if template in ("plain", "plain_bos"):
        for (count, _), (_, answer) in zip(users, pairs):
            out.images(count, newline=False)
            out.text(answer + "\n", True)
    elif template in ("qwen2", "vicuna_v1"):
        default = QWEN2_SYSTEM if template == "qwen2" else VICUNA_V1_SYSTEM
        out.text((system or system_prompt or default) + " ")
        for (count, question), (_, answer) in zip(users, pairs):
            out.text("USER: ")
            out.images(count, newline=True)
            out.text(question + " ASSISTANT:")
            if template == "qwen2":
                out.text(" " + answer + IM_END, True)
            else:
                out.text(" " + answer, True)
                out.special(LLAMA_EOS, True)
    elif template == "chatml":
        out.text(f"{IM_START}system\n{system or system_prompt or CHATML_SYSTEM}{IM_END}\n")
        for (count, question), (_, answer) in zip(users, pairs):
            out.text(f"{IM_START}user\n")
            out.images(count, newline=True)
            out.text(f"{question}{IM_END}\n{IM_START}assistant\n")
            out.text(answer + IM_END, True)
            out.text("\n")
    return out.segments


def render_caption(caption: str, n_images: int, template: str,
                   system_prompt: Optional[str] = None) -> List[Segment]:
    """A caption pair: plain renders ``<image>caption\\n``; chat templates render a
    one-turn conversation whose question is the image and whose answer is the caption."""
    if not caption.strip():
        raise TemplateError("missing_field", "empty caption")
    turns = [("user", IMAGE_TOKEN * n_images), ("assistant", caption.strip())]
    return render_conversation(turns, n_images, template, system_prompt)


def render_text(text: str, template: str = "plain") -> List[Segment]:
    """A text-only document: ``text\\n``, every token supervised (after the template's
    masked BOS, if it has one)."""
    if not text.strip():
        raise TemplateError("missing_field", "empty text")
    bos = TEMPLATE_SPECS[template].bos
    return ([Segment(bos, special=True)] if bos else []) + [Segment(text + "\n", True)]
