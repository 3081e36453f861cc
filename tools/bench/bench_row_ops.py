"""Time the row primitives the routed layer uses (gather, scatter, cat, rms_norm) on one device.

    python tools/bench/bench_row_ops.py --device cuda
"""

import argparse
import json

import torch
import torch.nn.functional as F


def _time(fn, device, iters=50):
    for _ in range(5):
        fn()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters * 1e3  # us
    import time
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args()
    dev, T = args.device, args.tokens
    for d in (1536, 2048, 3584):
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        perm = torch.randperm(T, device=dev)
        half = T // 2
        it, iv = perm[:half].sort().values, perm[half:].sort().values
        a, b = x[:half].contiguous(), x[half:].contiguous()
        w = torch.ones(d, device=dev, dtype=torch.bfloat16)

        def scatter():
            out = torch.empty_like(x)
            out.index_copy_(0, it, a)
            out.index_copy_(0, iv, b)

        res = {
            "d": d, "bytes_per_pass_MB": round(x.numel() * 2 / 1e6, 1),
            "index_select_perm_us": _time(lambda: x.index_select(0, perm), dev),
            "index_select_two_halves_us": _time(lambda: (x.index_select(0, it), x.index_select(0, iv)), dev),
            "index_copy_two_halves_us": _time(scatter, dev),
            "cat_two_halves_us": _time(lambda: torch.cat([a, b]), dev),
            "cat_then_index_select_us": _time(lambda: torch.cat([a, b]).index_select(0, perm), dev),
            "rms_norm_us": _time(lambda: F.rms_norm(x, (d,), w, 1e-6), dev),
            "add_us": _time(lambda: x + x, dev),
        }
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
