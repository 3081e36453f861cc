"""EVEv1's PAL under pipeline parallelism: the taps of earlier stages reach the last stage
inside a fixed-shape *carry*.

The PAL reads hs[k] for every k of ``config.pal_taps``: hs[0] the embedding output (first
chunk), hs[k] the output of global layer k (the chunk holding it), hs[L] the final norm's
output (last chunk). With PP > 1 every chunk but the last sends, instead of its hidden
states ``[s(/tp), b, h]``, the carry ``cat([hidden, slot_1, ..., slot_n], dim=0)``: one slot
per *carried* tap (:func:`carried_taps`, ascending), each the tap's ``[s(/tp), b, h]`` once
computed and zeros before; under sequence parallelism each rank carries its own sequence
chunk of every slot. The tap equal to the last chunk's input (hs[offset of the last chunk])
needs no slot: the last chunk reads it from its input. So Megatron's schedules run
unchanged with ``seq_length * carry_factor(config)`` as their sequence length, and the
backward flows through the carry (the gradient of a slot goes back to the chunk that
computed the tap; that of a zero slot is dropped). Costs: P2P volume and the pipeline's
send/receive buffers x ``carry_factor``; one copy per slot per stage boundary.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor


def last_chunk_offset(config) -> int:
    """Global index of the first decoder layer of the model's last pipeline chunk (last
    pipeline rank, last virtual stage); 0 without pipeline parallelism."""
    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return 0
    vp = config.virtual_pipeline_model_parallel_size
    return get_transformer_layer_offset(config, vp_stage=None if vp is None else vp - 1,
                                        pp_rank=pp - 1)


def carried_taps(config) -> List[int]:
    """The taps that travel in the carry, in slot order (ascending): those computed before
    the last chunk, except its input; none without pipeline parallelism."""
    if config.pipeline_model_parallel_size == 1:
        return []
    last = last_chunk_offset(config)
    return sorted(k for k in config.pal_taps if k < last)


def carry_factor(config) -> int:
    """Rows of a pipeline message per row of hidden states: 1 + number of carried taps."""
    return 1 + len(carried_taps(config))


def split_carry(carry: Tensor, taps: List[int]) -> Tuple[Tensor, Dict[int, Tensor]]:
    """``[(1 + n) * r, b, h]`` received carry -> (hidden ``[r, b, h]``, {tap: slot})
    (views: their gradients flow into ``carry``)."""
    parts = carry.chunk(1 + len(taps), dim=0)
    return parts[0], dict(zip(taps, parts[1:]))


def make_carry(hidden: Tensor, taps: List[int], computed: Dict[int, Tensor],
               received: Optional[Dict[int, Tensor]]) -> Tensor:
    """The carry this chunk sends: its hidden states, then per carried tap the state computed
    here, else the one received, else zeros (not computed yet)."""
    slots = []
    for k in taps:
        state = computed.get(k)
        if state is None and received is not None:
            state = received.get(k)
        slots.append(hidden.new_zeros(hidden.shape) if state is None else state)
    return torch.cat([hidden] + slots, dim=0)
