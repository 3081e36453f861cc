"""EVEv1Model: EVEModel's dense decoder (Megatron-Core TransformerBlock, TP/SP/PP, packed
attention, checkpoints) with EVEv1's patch embedding layer and projector as its image
tokenizer, and the patch aligning layer (PAL) on the last stage.

With ``teacher_pixel_values`` (the batch's teacher images; the frozen :class:`CLIPTeacher`
on the last stage turns them into patch features) or ready ``teacher_features``, plus
``teacher_valid`` and ``labels``, ``forward`` returns ``(per-token loss [b, s], PAL sum,
images)`` on the last stage: the trainer reduces the PAL per image and the token loss per
token, separately. The taps are read with forward hooks on the decoder layers, the
embedding and the final norm; under sequence parallelism they are gathered (backward: each
rank keeps its chunk). Under pipeline parallelism the taps of earlier stages travel to the
last stage in the carry of ``pipeline.py``: every other chunk returns the carry instead
of its hidden states, and the schedules run with ``seq_length * carry_factor``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.utils import get_pg_size
from torch import Tensor

from eve_megatron.models.eve.model import EVEModel
from eve_megatron.models.evev1 import pipeline
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
        self.carried = pipeline.carried_taps(config)
        """Taps of earlier chunks that travel in the carry (slot order); [] at PP=1."""
        self._slots: Optional[Dict[int, Tensor]] = None
        self._check_recompute()
        if self.post_process:
            self.pal = PatchAligningLayer(config)
            self.teacher = CLIPTeacher(config)

    @property
    def carry_factor(self) -> int:
        """Rows of a pipeline message per row of hidden states (pass ``seq_length *
        carry_factor`` to Megatron's schedules): 1 + the carried taps, 1 at PP=1."""
        return pipeline.carry_factor(self.config)

    def build_patch_embedding(self, config) -> torch.nn.Module:
        """EVEv1's PEL + ``mlp2x_gelu`` projector (replicated over TP)."""
        return EVEv1PatchEmbedding(config)

    def set_input_tensor(self, input_tensor) -> None:
        """The previous chunk's carry: its hidden part goes to the decoder, the tap slots are
        kept for this chunk's forward."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "EVEv1Model takes one input tensor"
            input_tensor = input_tensor[0]
        self._slots = None
        if self.carried and input_tensor is not None:
            input_tensor, self._slots = pipeline.split_carry(input_tensor, self.carried)
        super().set_input_tensor(input_tensor)

    def forward(self, tokens: Tensor, position_ids: Tensor, is_vision: Tensor,
                teacher_pixel_values: Optional[Tensor] = None,
                teacher_features: Optional[Tensor] = None, teacher_valid: Optional[Tensor] = None,
                **kwargs):
        """EVEModel's forward; with teacher inputs and labels also the PAL (see module). A
        chunk other than the last returns its carry at PP > 1."""
        if teacher_features is None and teacher_pixel_values is not None and self.post_process:
            teacher_features = self.teacher(teacher_pixel_values)
        send_carry = bool(self.carried) and not self.post_process
        with_pal = (self.post_process and teacher_features is not None
                    and kwargs.get("labels") is not None)
        if not self.pre_process and self.carried:
            self._check_carry(is_vision)
        if not (send_carry or with_pal):
            return super().forward(tokens, position_ids, is_vision, **kwargs)
        taps: Dict[int, Tensor] = {}
        hooks = self._tap_hooks(taps)
        try:
            out = super().forward(tokens, position_ids, is_vision, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        if send_carry:
            return pipeline.make_carry(out, self.carried, taps, self._slots)
        states = [self._full(self._tap(k, taps)) for k in self.config.pal_taps]
        pal_sum, n_images = pal_loss(self.pal, states, is_vision, kwargs["image_grid_hw"],
                                     teacher_features, teacher_valid)
        return out, pal_sum, n_images

    def _tap(self, k: int, taps: Dict[int, Tensor]) -> Tensor:
        """hs[k] on the last chunk: computed here, the chunk's input, or a carried slot."""
        if k in taps:
            return taps[k]
        if k == pipeline.last_chunk_offset(self.config):
            return self.decoder.input_tensor
        return self._slots[k]

    def _check_carry(self, is_vision: Tensor) -> None:
        rows = is_vision.shape[1] // (get_pg_size(self.tp_group)
                                      if self.config.sequence_parallel else 1)
        got = None if self.decoder.input_tensor is None else self.decoder.input_tensor.shape[0]
        if got != rows:
            raise ValueError(
                f"EVEv1 at PP > 1: this stage received {got} hidden rows (after splitting the "
                f"carry into {self.carry_factor} parts), expected {rows}; run the pipeline "
                f"schedule with seq_length * model.carry_factor")

    def _check_recompute(self) -> None:
        """Full recompute in units of R layers (``uniform``) keeps only each unit's output in
        the autograd graph: a tap inside a unit would silently get no gradient from the PAL."""
        c = self.config
        if c.recompute_granularity != "full" or c.recompute_method != "uniform":
            return
        numbers = [layer.layer_number for layer in self.decoder.layers]
        first = min(numbers, default=1) - 1
        inside = [k for k in c.pal_taps if k in numbers and k != c.num_layers
                  and (k - first) % c.recompute_num_layers]
        if inside:
            raise ValueError(
                f"EVEv1: full recompute in units of {c.recompute_num_layers} layers hides the PAL "
                f"taps {inside} inside a unit (no gradient would reach them): choose one that "
                f"ends a unit at every tap (e.g. dividing pal_layer_stride {c.pal_layer_stride} "
                f"and the layers per stage), recompute_method 'block' or selective recompute")

    def _tap_hooks(self, taps: Dict[int, Tensor]):
        """Forward hooks storing into ``taps`` every hs[k] of ``pal_taps`` this chunk computes:
        hs[0] (embedding), hs[k] (global layer k), hs[L] (final norm)."""
        n = self.config.num_layers

        def keep(k):
            return lambda module, args, out: taps.__setitem__(
                k, out[0] if isinstance(out, tuple) else out)

        modules = {layer.layer_number: layer for layer in self.decoder.layers}
        if self.pre_process:
            modules[0] = self.embedding
        modules.pop(n, None)  # hs[L] is after the final norm
        if self.post_process:
            modules[n] = self.decoder.final_layernorm
        return [modules[k].register_forward_hook(keep(k)) for k in self.config.pal_taps
                if k in modules]

    def _full(self, x: Tensor) -> Tensor:
        """``[s(/tp), b, h]`` -> ``[s, b, h]`` (sequence parallel: gathered)."""
        if not self.config.sequence_parallel:
            return x
        return tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=self.tp_group)
