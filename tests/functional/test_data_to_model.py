"""The data pipeline's batches drive the model through Megatron's schedule and it learns."""

import math

import torch

from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
from eve_megatron.data.loader import build_data_loader
from eve_megatron.models.eve import eve_config
from eve_megatron.training.model_setup import build_model_chunks, wrap_ddp
from eve_megatron.training.step import forward_step
from tests.unit._data_helpers import write_random_dataset


def test_loader_batches_train_the_model(megatron_world, tmp_path):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    prefix = str(tmp_path / "ds")
    write_random_dataset(prefix, n=24, seed=3, max_text=40)
    dataset = EVEPackedDataset(PackedDataConfig([prefix], seq_length=96, num_samples=4))
    batches = list(build_data_loader(dataset, consumed_samples=0, micro_batch_size=2,
                                     num_workers=0))
    assert len(batches) == 2 and all(int(b["is_vision"].sum()) > 0 for b in batches)

    cfg = eve_config("tiny", vocab_size=1024)
    chunks = build_model_chunks(cfg)
    ddp = wrap_ddp(chunks, cfg)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, bf16=False), ddp)
    patch = chunks[0].embedding.patch_embedding.conv1.weight
    patch_before = patch.detach().clone()
    losses, patch_grads = [], []
    for _ in range(5):
        ddp[0].zero_grad_buffer()
        opt.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=ddp[0],
            num_microbatches=2, seq_length=96, micro_batch_size=2, forward_only=False)
        patch_grads.append(float(patch.main_grad.norm()))  # before the step clips it
        opt.step()
        total = sum(r["lm loss"] for r in reported)
        losses.append(float(total[0] / total[1]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    # the pixels reach the loss: the first pixel-facing weight gets a gradient at every step
    # (zero if the pixels were all zero or no position was vision) and moves
    assert all(math.isfinite(g) and g > 1e-6 for g in patch_grads), patch_grads
    assert not torch.allclose(patch, patch_before, rtol=0, atol=1e-4)
