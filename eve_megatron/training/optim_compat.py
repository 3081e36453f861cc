"""Fixes for loading Megatron-Core 0.16.1's DistributedOptimizer state into plain torch
Adam/AdamW (what runs without Apex and Transformer Engine, e.g. on CPU).

torch's Adam keeps a per-parameter ``step`` tensor, which TE/Apex FusedAdam does not.
Megatron's load path then fails or goes subtly wrong:

1. ``_set_main_param_and_optimizer_states`` copies every key of the destination state,
   ``step`` included, from a source that never has ``step`` (KeyError). The patch copies
   the tensor states only; ``step`` comes from the checkpoint's param groups.
2. ``load_state_dict`` gives every parameter the SAME ``step`` tensor object; torch Adam
   increments each parameter's ``step`` in place, so the shared counter would advance
   once per parameter per step and corrupt the bias correction after a resume.
   :func:`unshare_adam_steps` gives each parameter its own copy.
"""

from __future__ import annotations

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_ORIGINAL = DistributedOptimizer._set_main_param_and_optimizer_states


def _set_states_without_step(self, model_param, tensors):
    if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _ORIGINAL(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    main_param.detach().copy_(tensors["param"])
    for key, value in state.items():
        if key != "step":
            value.copy_(tensors[key])


def install() -> None:
    """Patch Megatron's DistributedOptimizer (idempotent)."""
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_without_step


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter's ``step`` its own tensor (after loading optimizer state)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
