"""Torch Adam/AdamW (what runs without Apex and Transformer Engine, e.g. on CPU) under
Megatron-Core's DistributedOptimizer, after a checkpoint load.

torch's Adam keeps a per-parameter ``step`` tensor, which TE/Apex FusedAdam does not.
Megatron's load path then goes wrong in two ways:

1. ``_set_main_param_and_optimizer_states`` copies every key of the destination state,
   ``step`` included, from a source that never has ``step`` (KeyError). That private
   method is patched in :func:`eve_megatron.mcore_compat.patch_distributed_optimizer`
   (applied by ``training.optim.build_optimizer``).
2. ``load_state_dict`` gives every parameter the SAME ``step`` tensor object; torch Adam
   increments each parameter's ``step`` in place, so the shared counter would advance
   once per parameter per step and corrupt the bias correction after a resume.
   :func:`unshare_adam_steps` gives each parameter its own copy (public API only).
"""

from __future__ import annotations


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter's ``step`` its own tensor (after loading optimizer state)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
