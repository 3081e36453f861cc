"""EVEModel: the encoder-free vision-language decoder on Megatron-Core."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from eve_megatron.models.eve.config import EVEConfig
from eve_megatron.models.eve.embedding import EVEEmbedding
from eve_megatron.models.eve.flex_attention import document_block_mask
from eve_megatron.models.eve.patch_embedding import PatchEmbedding
from eve_megatron.models.eve.rope import rotary_cos_sin
from eve_megatron.models.eve.routing import (
    EVEPackedSeqParams,
    build_packed_seq_params,
    permute_rows,
)
from eve_megatron.models.eve.specs import get_eve_block_spec
from eve_megatron.models.eve.weights import VISION_TWINS

IGNORE_INDEX = -100


class EVEModel(LanguageModule):
    """Token + patch embedding -> routed decoder (Megatron ``TransformerBlock``) -> LM head.

    Args:
        config: the model config.
        pre_process: this chunk holds the embedding (first pipeline stage).
        post_process: this chunk holds the final norm and LM head (last stage).
        parallel_output: keep logits split over the vocab on tensor-parallel ranks.
        vp_stage: virtual pipeline stage of this chunk (interleaved schedule).
    """

    def __init__(self, config: EVEConfig, pre_process: Optional[bool] = None,
                 post_process: Optional[bool] = None, parallel_output: bool = True,
                 vp_stage: Optional[int] = None, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                 vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                                 vp_stage=vp_stage)
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.vocab_size = config.vocab_size
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.branch_pad_multiple = 16 if config.transformer_impl == "transformer_engine" else 1
        self.attention_backend = config.attention_impl

        if pre_process:
            self.embedding = EVEEmbedding(config, tp_group=self.tp_group,
                                          build_patch_embedding=self.build_patch_embedding)
        self.decoder = TransformerBlock(
            config=config,
            spec=get_eve_block_spec(config, vp_stage, get_pg_rank(self.pg_collection.pp)),
            pre_process=pre_process, post_process=post_process,
            pg_collection=self.pg_collection, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.vocab_size, config=config,
                init_method=config.init_method, bias=False, skip_bias_add=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.tp_group)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def build_patch_embedding(self, config) -> torch.nn.Module:
        """The image tokenizer of this family (EVEv2: :class:`PatchEmbedding`); a family's
        model subclass overrides it."""
        return PatchEmbedding(config)

    @property
    def carry_factor(self) -> int:
        """Rows of a pipeline message per row of hidden states: Megatron's schedules run with
        ``seq_length * carry_factor``. 1: a stage sends its hidden states only (a family may
        send more, e.g. EVEv1's PAL taps)."""
        return 1

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        assert len(input_tensor) == 1, "EVEModel takes one input tensor"
        self.decoder.set_input_tensor(input_tensor[0])

    def packed_seq_params(self, is_vision: Tensor, position_ids: Tensor,
                          cu_seqlens: Optional[Tensor] = None,
                          max_seqlen: Optional[int] = None) -> EVEPackedSeqParams:
        """Routing, packing and rotary metadata of one micro-batch (built on every stage)."""
        sp = self.config.sequence_parallel
        params = build_packed_seq_params(
            is_vision, cu_seqlens, max_seqlen,
            sequence_parallel_rank=get_pg_rank(self.tp_group) if sp else 0,
            sequence_parallel_size=get_pg_size(self.tp_group) if sp else 1,
            branch_pad_multiple=self.branch_pad_multiple,
            routed=bool(VISION_TWINS[self.config.decoupling]))
        if int(position_ids.max()) >= self.config.max_sequence_length:
            raise ValueError(f"position id {int(position_ids.max())} >= max_sequence_length "
                             f"{self.config.max_sequence_length}")
        params.cos, params.sin = rotary_cos_sin(position_ids, self.config.kv_channels,
                                                self.config.rotary_base)
        if self.attention_backend == "flex":  # once per micro-batch, shared by every layer
            params.flex_block_mask = document_block_mask(
                params.segment_ids, params.batch_size, params.seq_length, is_vision.device)
        return params

    def forward(self, tokens: Tensor, position_ids: Tensor, is_vision: Tensor,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                pixel_values: Optional[Tensor] = None, image_grid_hw: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **unused) -> Tensor:
        """One micro-batch in the batch-contract layout (see docs/design.md).

        Returns the per-token loss ``[b, s]`` (fp32, 0 where ``labels == -100``) when
        ``labels`` is given on the last stage, the logits ``[b, s, vocab(/tp)]`` without
        labels, and the hidden states ``[s(/tp), b, h]`` on other stages.
        """
        params = self.packed_seq_params(is_vision, position_ids, cu_seqlens, max_seqlen)
        decoder_input = None
        if self.pre_process:
            emb = self.embedding(tokens, is_vision, pixel_values, image_grid_hw)
            # The decoder keeps each rank's rows in branch order (see routing.py).
            decoder_input = permute_rows(emb.view(-1, emb.shape[-1]), params.local_from_seq,
                                         params.seq_from_local).view(emb.shape)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None,
                              packed_seq_params=params)
        if not self.post_process:
            return hidden
        hidden = permute_rows(hidden.view(-1, hidden.shape[-1]), params.seq_from_local,
                              params.local_from_seq).view(hidden.shape)
        weight = self.shared_embedding_or_output_weight() if (
            self.share_embeddings_and_output_weights) else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        supervised = labels != IGNORE_INDEX
        loss = self.compute_language_model_loss(labels.masked_fill(~supervised, 0), logits)
        return loss * supervised
