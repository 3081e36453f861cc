"""EVEv1 (EVE-7B-v1.0): Vicuna decoder, patch embedding layer, visual supervision (PAL).

Reuses ``models/eve`` (decoder, routing, checkpoints); only the config, the PEL and the
model class live here.
"""

from eve_megatron.models.evev1.config import PRESETS, EVEv1Config, evev1_config
from eve_megatron.models.evev1.model import EVEv1Model
from eve_megatron.models.evev1.patch_embedding import EVEv1PatchEmbedding

__all__ = ["EVEv1Config", "EVEv1Model", "EVEv1PatchEmbedding", "PRESETS", "evev1_config"]
