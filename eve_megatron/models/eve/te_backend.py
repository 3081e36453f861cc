"""Transformer Engine modules for the EVE layer (GPU; imported only when selected).

Norms are per branch, so the norm cannot be fused into the following linear: the TE
spec uses standalone ``TENorm`` plus TE linears. The branch linears hold a tensor-parallel
shard and run TE's GEMM (BF16 or FP8) with TE communication disabled: the routed layer
does the collectives once for both branches. FP8 GEMMs need each branch's token count
padded to a multiple of 16, which :func:`eve_megatron.models.eve.routing.apply_branches` does.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none

try:
    import transformer_engine.pytorch as te
except ImportError as exc:  # pragma: no cover - exercised only without TE
    raise ImportError("transformer_impl='transformer_engine' needs Transformer Engine "
                      "(pip install transformer-engine[pytorch]) and a CUDA GPU") from exc

from megatron.core.extensions.transformer_engine import TENorm  # noqa: E402

FP8_BRANCH_MULTIPLE = 16


class _TEBranchLinear(te.Linear):
    """A TE ``Linear`` over this rank's shard, with no TE-side tensor-parallel communication."""

    partition_dim = 0

    def __init__(self, input_size, output_size, *, config, init_method, bias, skip_bias_add,
                 tp_group=None, stride=1, **unused):
        self.config = config
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        world, rank = get_pg_size(self._tp_group), get_pg_rank(self._tp_group)
        sizes = [output_size, input_size]
        sizes[self.partition_dim] = divide(sizes[self.partition_dim], world)
        self.skip_bias_add = skip_bias_add
        super().__init__(
            in_features=sizes[1], out_features=sizes[0], bias=bias,
            init_method=(lambda w: None) if config.use_cpu_initialization else init_method,
            get_rng_state_tracker=get_cuda_rng_tracker, params_dtype=config.params_dtype,
            fuse_wgrad_accumulation=config.gradient_accumulation_fusion, parallel_mode=None,
            tp_size=1, sequence_parallel=False, device="cuda",
        )
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                self.weight, output_size, input_size, sizes[self.partition_dim],
                self.partition_dim, init_method, stride=stride, params_dtype=config.params_dtype,
                rank=rank, world_size=world, skip_set_tensor_parallel_attributes=True)
        set_tensor_model_parallel_attributes(self.weight, True, self.partition_dim, stride)
        if bias and self.partition_dim == 0:
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        for param in self.parameters():
            setattr(param, "allreduce", True)

    def forward(self, x):  # noqa: D102
        out = super().forward(x)
        return out, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):  # noqa: D102
        axis = {"weight": 0, "bias": 0} if self.partition_dim == 0 else {"weight": 1}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])


class TEBranchColumnParallelLinear(_TEBranchLinear):
    """Column-parallel TE shard ``[out/tp, in]``."""

    partition_dim = 0

    def __init__(self, input_size, output_size, *, gather_output=False, **kwargs):
        if gather_output:
            raise ValueError("branch linears never gather their output")
        super().__init__(input_size, output_size, **kwargs)


class TEBranchRowParallelLinear(_TEBranchLinear):
    """Row-parallel TE shard ``[out, in/tp]``; its partial sums are reduced by the layer."""

    partition_dim = 1

    def __init__(self, input_size, output_size, *, input_is_parallel=True, bias=False, **kwargs):
        if bias:
            raise ValueError("a branch row-parallel bias must be added after the reduction")
        super().__init__(input_size, output_size, bias=False, **kwargs)


__all__ = ["TENorm", "TEBranchColumnParallelLinear", "TEBranchRowParallelLinear",
           "FP8_BRANCH_MULTIPLE"]
