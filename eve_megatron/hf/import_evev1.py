"""What the importer needs to know about EVEv1 sources: the released EVE-7B-v1.0 folder
(``model_type "eve"``, ``EVELlamaForCausalLM``) or a plain Llama/Vicuna folder, plus an
optional HF CLIP folder for the teacher (a ``CLIPModel`` or a transformers 4.x
``CLIPVisionModel`` stores ``vision_model.*``, a 5.x ``CLIPVisionModel`` the bare names).

- :func:`read_evev1_fields`: the architecture (``family: evev1``) of such a folder;
- :class:`EVEv1Weights`: the folder's tensors with the teacher's released names
  (``model.vision_clip.backbone.vision_model.*``) read from the CLIP folder, or from the
  folder's alias of them (``model.vision_tower_compressor.clip_layer...``);
- :func:`fresh_evev1`: a new patch embedding layer and PAL (seeded, identical on every
  rank) for a Llama source, which has neither.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from eve_megatron.hf import config_map_evev1
from eve_megatron.hf.hf_files import HFWeights
from eve_megatron.hf.mapping_evev1 import CLIP, CLIP_ALIAS

CLIP_PROBE = "embeddings.class_embedding"
"""A tensor every CLIP vision tower has (how the teacher folder's prefix is found)."""
CLIP_TOP = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
"""Top-level module names of an HF CLIP vision tower."""

FRESH_PREFIXES = ("embedding.patch_embedding.", "pal.")
"""Megatron names a Llama source lacks and the import draws fresh."""


def is_evev1_source(cfg: dict) -> bool:
    """An EVEv1 (``eve``) or plain Llama/Vicuna (``llama``) ``config.json``."""
    return config_map_evev1.is_evev1_config(cfg) or cfg.get("model_type") == "llama"


def read_evev1_fields(cfg: dict, teacher_dir: Optional[str] = None,
                      vision_hidden_size: int = 1024) -> dict:
    """EVEv1 ``MODEL_FIELDS`` of a source ``config.json``; the teacher's sizes from
    ``teacher_dir``'s ``config.json`` when given."""
    teacher = None
    if teacher_dir:
        path = os.path.join(teacher_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher {teacher_dir!r} has no config.json (an HF CLIP "
                                    "vision model folder is needed)")
        with open(path) as f:
            teacher = config_map_evev1.teacher_config(json.load(f))
    return config_map_evev1.fields_from_hf(cfg, teacher, vision_hidden_size)


class EVEv1Weights:
    """An EVEv1/Llama folder's tensors, the teacher's (``CLIP`` names) read from
    ``teacher_dir`` (a CLIP folder) when given, else from the folder itself under ``CLIP``
    or under the release's alias ``CLIP_ALIAS``; the same interface as :class:`HFWeights`."""

    def __init__(self, weights: HFWeights, teacher_dir: Optional[str] = None):
        self.weights, self.folder = weights, weights.folder
        self.teacher = HFWeights(teacher_dir) if teacher_dir else None
        self.prefix = CLIP
        if self.teacher is not None:
            names = set(self.teacher.names())
            self.prefix = next((p for p in ("vision_model.", "") if p + CLIP_PROBE in names), None)
            if self.prefix is None:
                raise ValueError(f"teacher {teacher_dir!r} holds no CLIP vision tower (neither "
                                 f"'vision_model.{CLIP_PROBE}' nor {CLIP_PROBE!r}: not an HF "
                                 "CLIPVisionModel / CLIPModel folder)")
        elif CLIP + CLIP_PROBE not in weights and CLIP_ALIAS + CLIP_PROBE in weights:
            self.prefix = CLIP_ALIAS

    def _where(self, name: str) -> Tuple[HFWeights, str]:
        """The folder and stored name holding our (released) ``name``."""
        if name.startswith(CLIP):
            return self.teacher or self.weights, self.prefix + name[len(CLIP):]
        return self.weights, name

    def __contains__(self, name: str) -> bool:
        source, stored = self._where(name)
        return stored in source

    def names(self) -> List[str]:
        """The folder's names (its own teacher, under either name, left out) and the
        teacher's, under ``CLIP`` names."""
        own = [n for n in self.weights.names() if not n.startswith((CLIP, CLIP_ALIAS))]
        source = self.teacher or self.weights
        tower = [n[len(self.prefix):] for n in source.names() if n.startswith(self.prefix)]
        return own + [CLIP + n for n in tower if n.split(".")[0] in CLIP_TOP]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of a tensor."""
        source, stored = self._where(name)
        return source.dtype(stored)

    def read(self, name: str) -> torch.Tensor:
        """One tensor (KeyError naming it when absent)."""
        source, stored = self._where(name)
        return source.read(stored)


def fresh_evev1(fields: dict, seed: int) -> Dict[str, torch.Tensor]:
    """A new PEL (+ projector) and PAL drawn from ``seed``, under Megatron names."""
    from eve_megatron.models.eve.config import config_from_fields
    from eve_megatron.models.evev1.pal import PatchAligningLayer
    from eve_megatron.models.evev1.patch_embedding import EVEv1PatchEmbedding

    cfg = config_from_fields(fields, use_cpu_initialization=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pel, pal = EVEv1PatchEmbedding(cfg), PatchAligningLayer(cfg)
    out = {FRESH_PREFIXES[0] + k: v.detach() for k, v in pel.state_dict().items()}
    out.update({FRESH_PREFIXES[1] + k: v.detach() for k, v in pal.state_dict().items()})
    return out
