"""The EVE family (EVEv1.0 dense, EVEv1.5 MLP-decoupled, EVEv2.0 divide-and-conquer)."""

from eve_megatron.models.eve.config import PRESETS, EVEConfig, eve_config
from eve_megatron.models.eve.model import IGNORE_INDEX, EVEModel
from eve_megatron.models.eve.patch_embedding import image_token_counts, images_to_blocks

__all__ = ["EVEConfig", "EVEModel", "PRESETS", "eve_config", "IGNORE_INDEX",
           "image_token_counts", "images_to_blocks"]
