"""Profile one forward+backward step of the routed and dense models (top kernels by time).

    python tools/bench/profile_routing.py --device cuda --dtype bf16 --preset qwen2.5-1.5b --layers 4
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_routing as br  # noqa: E402


def main():
    args = br._args()
    from eve_megatron.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    for decoupling in ("all", "none"):
        model = br._model(args, decoupling, args.device)
        batch, _ = br._batch(args, args.device, model.config.vocab_size)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            br._step(model, batch, args.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            model.zero_grad(set_to_none=True)
            br._step(model, batch, args.device)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"=== decoupling={decoupling}")
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
        del model


if __name__ == "__main__":
    main()
