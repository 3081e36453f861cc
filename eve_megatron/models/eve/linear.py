"""Branch linears: tensor-parallel weight shards whose forward does no communication.

Both branches of a routed layer share one collective (all-gather or copy before the
column-parallel projections, reduce-scatter or all-reduce after the row-parallel ones),
issued by the layer itself; so each branch's linear only multiplies its own tokens by
its own shard. Weights, initialisation, tensor-parallel attributes and sharded
checkpoints are Megatron-Core's.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from eve_megatron import mcore_compat


def _local_matmul(linear, x, bias):
    if not linear.gradient_accumulation_fusion:
        # Same math; native autograd dispatches far faster than Megatron's Python Function,
        # which matters because routing doubles the number of linear calls.
        return F.linear(x, linear.weight, bias)
    return mcore_compat.local_linear(linear, x, bias)


class BranchColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel shard ``[out/tp, in]``; input already replicated on the TP group."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        bias = None if self.skip_bias_add else self.bias
        return _local_matmul(self, input_, bias), (self.bias if self.skip_bias_add else None)


class BranchRowParallelLinear(RowParallelLinear):
    """Row-parallel shard ``[out, in/tp]``; returns partial sums the layer reduces."""

    def forward(self, input_):
        if self.bias is not None and not self.skip_bias_add:
            raise ValueError("a branch row-parallel bias must be added after the reduction")
        return _local_matmul(self, input_, None), self.bias
