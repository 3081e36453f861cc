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


def test_evev1_batches_drive_the_evev1_model_and_its_pal(megatron_world, tmp_path):
    """An EVEv1 dataset (vicuna_v1, x2 and x4 images, a text-only sample) -> loader batch
    -> EVEv1Model with the full loss: token loss, PAL over every image against the teacher
    run on the batch's teacher images, gradients reaching the patch embedding."""
    import json

    from PIL import Image

    from eve_megatron.data.images import ImageConfig
    from eve_megatron.data.preprocess import PreprocessConfig, run_preprocess
    from eve_megatron.models.evev1 import EVEv1Model, evev1_config
    from tests.unit._data_helpers import make_llama_sp_tokenizer, random_rgb

    for name, (w, h) in {"a.png": (1000, 333), "b.png": (50, 40)}.items():
        Image.fromarray(random_rgb(w, h, w)).save(tmp_path / name)
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [{"image": "a.png", "conversations": turns("<image>\nWhat?", "A cat.")},
               {"image": "b.png", "conversations": turns("<image>\nAnd?", "Two dogs.")},
               {"conversations": turns("Hi?", "Hello.")}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tok = make_llama_sp_tokenizer(str(tmp_path / "tok"))
    for ratio in (2, 4):
        prefix = str(tmp_path / f"ds{ratio}")
        run_preprocess(PreprocessConfig(
            inputs=[str(tmp_path / "d.json")], output_prefix=prefix, tokenizer=tok,
            template="vicuna_v1", model_family="evev1", evev1_ratio=ratio,
            image_root=str(tmp_path), seq_length=4096, workers=0, progress=False,
            image=ImageConfig(encode_format="png")))
        dataset = EVEPackedDataset(PackedDataConfig([prefix], seq_length=4096, num_samples=1))
        batch = next(iter(build_data_loader(dataset, 0, 1, num_workers=0)))
        cfg = evev1_config("evev1-tiny", teacher_image_size=336)
        assert dataset.block == cfg.patch_stride * cfg.dense_stride
        model = EVEv1Model(cfg)
        keys = ("tokens", "position_ids", "is_vision", "cu_seqlens", "max_seqlen", "pixel_values",
                "image_grid_hw", "labels", "teacher_pixel_values", "teacher_valid")
        per_token, pal_sum, n_images = model(**{k: batch[k] for k in keys})
        assert n_images == 2 and torch.isfinite(per_token).all() and float(pal_sum) > 0
        (per_token.sum() / (batch["labels"] != -100).sum() + pal_sum / n_images).backward()
        assert float(model.embedding.patch_embedding.conv.weight.grad.norm()) > 0
