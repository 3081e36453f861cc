"""Input embedding: token embeddings with the image tokens spliced in at vision positions."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from eve_megatron.models.eve.patch_embedding import PatchEmbedding


class EVEEmbedding(MegatronModule):
    """``word_embeddings`` (vocab-parallel) + ``patch_embedding`` (replicated).

    ``build_patch_embedding(config)`` makes any module mapping ``(pixel_values [P, 3*B*B],
    image_grid_hw)`` to the image tokens ``[sum N_i, hidden]`` in stream order (default:
    EVEv2's :class:`PatchEmbedding`; a model family passes its own). It is called after the
    word embeddings are made, so the random initialisation order is the same for every family."""

    def __init__(self, config, tp_group=None,
                 build_patch_embedding: Optional[Callable] = None):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=config.embedding_init_method,
            reduce_scatter_embeddings=False, config=config, tp_group=tp_group)
        self.patch_embedding = (build_patch_embedding or PatchEmbedding)(config)

    def forward(self, tokens: Tensor, is_vision: Tensor, pixel_values: Optional[Tensor] = None,
                image_grid_hw: Optional[Tensor] = None) -> Tensor:
        """``[b, s]`` ids -> ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism)."""
        emb = self.word_embeddings(tokens.masked_fill(is_vision, 0))  # [b, s, h]
        if pixel_values is None:
            # Text-only batch: still run the patch embedding (on nothing) so that its
            # parameters get a zero gradient and DDP buckets complete.
            block = self.config.block_size
            pixel_values = emb.new_zeros(0, 3 * block * block)
            image_grid_hw = torch.zeros(0, 2, dtype=torch.long, device=emb.device)
        image_tokens = self.patch_embedding(pixel_values, image_grid_hw)
        n_vision = int(is_vision.sum())
        if image_tokens.shape[0] != n_vision:
            raise ValueError(f"is_vision marks {n_vision} tokens but the images "
                             f"{image_grid_hw.tolist()} make {image_tokens.shape[0]}")
        emb = emb.masked_scatter(is_vision.unsqueeze(-1), image_tokens.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb, group=self.tp_group)
        if self.config.hidden_dropout == 0.0:
            return emb
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel
               else nullcontext())
        with rng:
            return F.dropout(emb, p=self.config.hidden_dropout, training=self.training)
