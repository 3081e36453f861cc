"""Entry point of one rank started by :func:`eve_megatron.launch.run_distributed`."""

import importlib
import pickle
import sys


def main(target: str, args_path: str, result_path: str) -> None:
    """Initialise the default process group, run ``target`` and store its result."""
    import torch

    from eve_megatron.parallel import init_distributed

    init_distributed()  # sets this rank's GPU before NCCL starts (LOCAL_RANK)
    try:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        with open(args_path, "rb") as f:
            kwargs = pickle.load(f)
        result = func(**kwargs)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        import os

        os.replace(result_path + ".tmp", result_path)
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
