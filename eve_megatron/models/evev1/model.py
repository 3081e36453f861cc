"""EVEv1Model: EVEModel's dense decoder (Megatron-Core TransformerBlock, TP/SP, packed
attention, checkpoints) with EVEv1's patch embedding layer and projector as its image
tokenizer, and the patch aligning layer (PAL) on the last stage.

With ``teacher_pixel_values`` (the batch's teacher images; the frozen :class:`CLIPTeacher`
on the last stage turns them into patch features) or ready ``teacher_features``, plus
``teacher_valid`` and ``labels``, ``forward`` returns ``(per-token loss [b, s], PAL sum,
images)``:
the trainer reduces the PAL per image and the token loss per token, separately. The taps
are read with forward hooks on the decoder layers, the embedding and the final norm;
under sequence parallelism they are gathered (backward: each rank keeps its chunk).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import tensor_parallel
from torch import Tensor

from eve_megatron.models.eve.model import EVEModel
from eve_megatron.models.evev1.config import EVEv1Config
from eve_megatron.models.evev1.pal import PatchAligningLayer, pal_loss
from eve_megatron.models.evev1.patch_embedding import EVEv1PatchEmbedding
from eve_megatron.models.evev1.teacher import CLIPTeacher


class EVEv1Model(EVEModel):
    """Vicuna decoder + PEL (+ PAL on the last stage); batch contract with 28-pixel blocks."""

    def __init__(self, config: EVEv1Config, **kwargs):
        if not isinstance(config, EVEv1Config):
            raise TypeError(f"EVEv1Model needs an EVEv1Config, got {type(config).__name__}")
        super().__init__(config, **kwargs)
        if self.post_process:
            self.pal = PatchAligningLayer(config)
            self.teacher = CLIPTeacher(config)

    def build_patch_embedding(self, config) -> torch.nn.Module:
        """EVEv1's PEL + ``mlp2x_gelu`` projector (replicated over TP)."""
        return EVEv1PatchEmbedding(config)

    def forward(self, tokens: Tensor, position_ids: Tensor, is_vision: Tensor,
                teacher_pixel_values: Optional[Tensor] = None,
                teacher_features: Optional[Tensor] = None, teacher_valid: Optional[Tensor] = None,
                **kwargs):
        """EVEModel's forward; with teacher inputs and labels also the PAL (see module)."""
        if teacher_features is None and teacher_pixel_values is not None and self.post_process:
            teacher_features = self.teacher(teacher_pixel_values)
        if teacher_features is None or kwargs.get("labels") is None:
            return super().forward(tokens, position_ids, is_vision, **kwargs)
        if not (self.pre_process and self.post_process):
            raise NotImplementedError("the PAL under pipeline parallelism is not implemented yet "
                                      "(issue 13): train EVEv1 with PP=1")
        taps: Dict[int, Tensor] = {}
        hooks = self._tap_hooks(taps)
        try:
            per_token = super().forward(tokens, position_ids, is_vision, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        states = [self._full(taps[k]) for k in self.config.pal_taps]
        pal_sum, n_images = pal_loss(self.pal, states, is_vision, kwargs["image_grid_hw"],
                                     teacher_features, teacher_valid)
        return per_token, pal_sum, n_images

    def _tap_hooks(self, taps: Dict[int, Tensor]):
        """Forward hooks storing hs[k] for every tapped k into ``taps``."""
        n = self.config.num_layers

        def keep(k):
            return lambda module, args, out: taps.__setitem__(
                k, out[0] if isinstance(out, tuple) else out)

        hooks = []
        for k in self.config.pal_taps:
            if k == 0:
                hooks.append(self.embedding.register_forward_hook(keep(0)))
            elif k == n:
                hooks.append(self.decoder.final_layernorm.register_forward_hook(keep(n)))
            else:
                hooks.append(self.decoder.layers[k - 1].register_forward_hook(keep(k)))
        return hooks

    def _full(self, x: Tensor) -> Tensor:
        """``[s(/tp), b, h]`` -> ``[s, b, h]`` (sequence parallel: gathered)."""
        if not self.config.sequence_parallel:
            return x
        return tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=self.tp_group)
