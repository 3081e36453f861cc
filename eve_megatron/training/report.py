"""Progress reports every ``--log-interval``: stdout line + TensorBoard scalars.

Reported by the last rank (it holds the loss): loss, learning rate, grad norm,
tokens/s split into image and text tokens, samples/s, skipped steps and, on GPU, model
TFLOP/s per GPU and MFU (model FLOPs from ``models/eve/flops.py`` over every computed
token, padding included, as Megatron counts them).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional

import torch
from megatron.core import parallel_state as ps

from eve_megatron.models.eve.flops import model_flops_per_token
from eve_megatron.training.data_setup import STAT_NAMES

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}
"""Dense BF16 peak TFLOP/s per GPU, matched against ``torch.cuda.get_device_name()``."""


def peak_tflops(override: Optional[float]) -> Optional[float]:
    """The per-GPU peak for MFU: ``--peak-tflops`` or the table above (None on CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def is_logging_rank() -> bool:
    """The last global rank reports (it is on the last pipeline stage)."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class Reporter:
    """Accumulates per-iteration numbers and reports every ``log_interval`` iterations."""

    def __init__(self, cfg, model_config, total_iters: int, start_iter: int):
        self.cfg, self.total = cfg, total_iters
        self.interval = cfg.logging.log_interval
        self.corrupt_total = 0
        self.flops_per_token = model_flops_per_token(model_config, cfg.data.seq_length)
        self.peak = peak_tflops(cfg.logging.peak_tflops)
        self.on = is_logging_rank()
        self.writer = None
        if self.on and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        self.bar = None
        if self.on and cfg.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True)
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        self.loss_sum = self.loss_count = 0.0
        self.pal_sum = self.pal_count = 0.0
        self.iters = self.skipped = 0
        self.grad_norm = float("nan")

    def add(self, iteration: int, stats: torch.Tensor, loss: Optional[float], grad_norm,
            lr: float, skipped: bool, pal_loss: Optional[float] = None) -> None:
        """Record one iteration (``stats`` summed over data-parallel ranks; ``pal_loss``:
        EVEv1's visual-supervision loss, reported beside the token loss)."""
        self.stats += stats
        if pal_loss is not None and math.isfinite(pal_loss):
            self.pal_sum += pal_loss
            self.pal_count += 1
        self.corrupt_total += int(stats[STAT_NAMES.index("corrupt_samples")])
        self.iters += 1
        self.skipped += int(skipped)
        if loss is not None and math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)
        self.lr = lr
        if self.bar is not None:
            self.bar.update(1)
        if iteration % self.interval == 0 or iteration == self.total:
            self._emit(iteration)

    def _emit(self, iteration: int) -> None:
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        image, text, samples, rows, _ = self.stats.tolist()
        loss = self.loss_sum / self.loss_count if self.loss_count else None  # None: all skipped
        m: Dict[str, float] = {
            "learning-rate": self.lr,
            "grad-norm": self.grad_norm, "tokens-per-sec": (image + text) / seconds,
            "image-tokens-per-sec": image / seconds, "text-tokens-per-sec": text / seconds,
            "samples-per-sec": samples / seconds, "rows-per-sec": rows / seconds,
            "ms-per-iteration": 1000 * seconds / max(self.iters, 1), "skipped": self.skipped}
        if loss is not None:
            m["lm-loss"] = loss
        if self.pal_count:
            m["pal-loss"] = self.pal_sum / self.pal_count
        line = (f"iteration {iteration:8d}/{self.total} | lr {m['learning-rate']:.3e} | "
                f"loss {'skipped' if loss is None else format(loss, '.6e')} | "
                + (f"pal loss {m['pal-loss']:.6e} | " if "pal-loss" in m else "")
                + f"grad norm {m['grad-norm']:.4f} | "
                f"ms/iter {m['ms-per-iteration']:.1f} | tokens/s {m['tokens-per-sec']:.0f} "
                f"(image {m['image-tokens-per-sec']:.0f}, text {m['text-tokens-per-sec']:.0f}) | "
                f"samples/s {m['samples-per-sec']:.2f} | skipped {self.skipped}")
        if self.corrupt_total:  # --corrupt-samples skip: damaged samples left out so far
            m["corrupt-samples"] = self.corrupt_total
            line += f" | damaged samples skipped {self.corrupt_total}"
        if torch.cuda.is_available():
            computed = rows * self.cfg.data.seq_length  # padding is computed too
            tflops = computed * self.flops_per_token / seconds / 1e12 / torch.distributed.get_world_size()
            m["tflops-per-gpu"] = tflops
            line += f" | TFLOP/s/GPU {tflops:.1f}"
            if self.peak:
                m["mfu"] = tflops / self.peak
                line += f" | MFU {100 * m['mfu']:.1f}%"
        if self.on:
            self._print(line)
            if self.writer is not None:
                for key, value in m.items():
                    self.writer.add_scalar(key, value, iteration)
                self.writer.flush()
        self.last = m
        self._reset()

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def data_parallel_sum(stats: torch.Tensor) -> torch.Tensor:
    """Sum per-rank batch statistics over the data-parallel group."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    out = stats.to(device)
    torch.distributed.all_reduce(out, group=ps.get_data_parallel_group())
    return out.cpu()
