"""Training configuration: recipes, flags, validation, stages, schedules, batch statistics."""

import glob
import os

import numpy as np
import pytest
import torch

from eve_megatron.training.arguments import apply_recipe, build_parser, parse_config
from eve_megatron.training.config import ConfigError, TrainConfig
from eve_megatron.training.data_setup import batch_stats
from eve_megatron.training.optim import lr_schedule_iters
from eve_megatron.training.stages import build_model_config, is_trainable, trainable_set
from tests.reference_eve import RefShape, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVE7B = {"stage0": ("0", 2e-4, 1024, 2048), "stage1.0": ("1.0", 1e-4, 1024, 2048),
         "stage1.1": ("1.1", 5e-5, 1024, 4096), "stage2": ("2", 2e-5, 512, 4096),
         "stage3": ("3", 1e-5, 512, 5000)}


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_flags_override_recipes_in_order(tmp_path):
    a = _write(tmp_path, "training:\n  micro_batch_size: 2\n  train_iters: 10\n"
               "optimizer:\n  lr: 2e-4\n", "a.yaml")
    b = _write(tmp_path, "training:\n  micro_batch_size: 3\n", "b.yaml")
    cfg = parse_config(["--config", a, b, "--lr", "5e-5", "--tensor-model-parallel-size", "2",
                        "--data-path", "0.3", "x", "0.7", "y", "--no-decoupled-weight-decay"])
    assert cfg.training.micro_batch_size == 3 and cfg.training.train_iters == 10
    assert cfg.optimizer.lr == 5e-5  # YAML 1.1 '2e-4' strings are read as numbers too
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.data.data_path == ["0.3", "x", "0.7", "y"]
    assert cfg.optimizer.decoupled_weight_decay is False


@pytest.mark.parametrize("text, words", [
    ("trainig:\n  seed: 1\n", ["unknown section 'trainig'", "did you mean 'training'"]),
    ("data:\n  seq_lenght: 5\n", ["unknown key in section 'data'", "'seq_lenght'", "seq_length"]),
    ("training:\n  micro_batch_size: 1.5\n", ["training.micro_batch_size", "integer"]),
    ("model:\n  bf16: yes please\n", ["model.bf16", "true/false"]),
    ("training:\n  stage: '4'\n", ["training.stage", "not one of"]),
    ("- a\n- b\n", ["mapping of sections"]),
])
def test_bad_recipes_name_file_section_and_key(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        apply_recipe(TrainConfig(), path)
    for word in words + [path]:
        assert word in str(err.value)


def test_validation_messages():
    cfg = parse_config(["--data-path", "x", "--train-iters", "3", "--global-batch-size", "6",
                        "--micro-batch-size", "4"])
    with pytest.raises(ConfigError, match="divisible by micro_batch_size 4"):
        cfg.validate(world_size=1)
    cfg = parse_config(["--data-path", "x"])
    with pytest.raises(ConfigError, match="exactly one of --train-iters"):
        cfg.validate(1)
    cfg = parse_config(["--data-path", "x", "--train-iters", "2", "--tensor-model-parallel-size", "3"])
    with pytest.raises(ConfigError, match="not divisible by TP"):
        cfg.validate(world_size=4)
    cfg = parse_config(["--data-path", "x", "--train-iters", "2", "--fp8-format", "hybrid"])
    with pytest.raises(ConfigError, match="transformer_engine"):
        cfg.validate(1)


def test_every_megatron_flag_of_the_issue_exists():
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--sequence-parallel", "--micro-batch-size", "--global-batch-size",
                 "--seq-length", "--train-samples", "--train-iters", "--lr", "--min-lr",
                 "--lr-warmup-fraction", "--lr-decay-style", "--weight-decay", "--clip-grad",
                 "--bf16", "--fp8-format", "--recompute-granularity", "--data-path",
                 "--tokenizer-model", "--save", "--load", "--save-interval", "--log-interval",
                 "--seed", "--finetune"):
        assert flag in flags, flag


@pytest.mark.parametrize("name", sorted(EVE7B))
def test_eve7b_recipes_mirror_the_reference_table(name):
    stage, lr, gbs, seq = EVE7B[name]
    cfg = parse_config(["--config", os.path.join(ROOT, "examples", "eve7b", f"{name}.yaml")])
    cfg.validate(world_size=128)
    assert (cfg.training.stage, cfg.optimizer.lr, cfg.training.global_batch_size,
            cfg.data.seq_length) == (stage, lr, gbs, seq)
    assert cfg.model.bf16 and cfg.optimizer.weight_decay == 0.0
    assert cfg.optimizer.lr_decay_style == "cosine" and cfg.optimizer.lr_warmup_fraction == 0.03
    assert trainable_set(cfg) == {"0": "patch_embedding", "1.0": "vision", "1.1": "vision"}.get(
        stage, "all")


EVEV1 = {"prealign": ("vision", 4e-4, 512, 2048, 0.03), "pretrain": ("all", 4e-5, 512, 2048, 0.01),
         "sft": ("all", 2e-5, 128, 2048, 0.01), "sft_hd": ("all", 2e-5, 128, 4096, 0.01)}
"""EVEv1 stages of ../shared/docs/evev1_reference.md section 3: trainable set, LR, global
batch, max length, warmup."""


@pytest.mark.parametrize("name", sorted(EVEV1))
def test_evev1_recipes_mirror_the_reference_table(name):
    cfg = parse_config(["--config", os.path.join(ROOT, "examples", "evev1", f"{name}.yaml")])
    cfg.validate(world_size=32)
    assert (trainable_set(cfg), cfg.optimizer.lr, cfg.training.global_batch_size,
            cfg.data.seq_length, cfg.optimizer.lr_warmup_fraction) == EVEV1[name]
    assert cfg.model.preset == "evev1-7b" and cfg.parallel.pipeline_model_parallel_size == 1
    assert cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.lr_decay_style == "cosine"
    cpu = parse_config(["--config", os.path.join(ROOT, "examples", "evev1", f"{name}.yaml"),
                        "--transformer-impl", "local", "--attention-backend", "sdpa"])
    model = build_model_config(cpu, None)  # the architecture (TE is GPU-only)
    assert type(model).FAMILY == "evev1" and model.num_layers == 32 and model.vocab_size == 32000


def test_quickstart_recipes_parse():
    for path in glob.glob(os.path.join(ROOT, "examples", "quickstart", "*.yaml")):
        cfg = parse_config(["--config", path, "--data-path", "x"])
        cfg.validate(world_size=2)


def test_stage_decoupling_rules():
    cfg = parse_config(["--model-preset", "tiny", "--stage", "0", "--data-path", "x",
                        "--train-iters", "1"])
    assert build_model_config(cfg, None).decoupling == "none"
    cfg.training.stage = "1.0"
    with pytest.raises(ConfigError, match="copy_vision_branch"):
        build_model_config(cfg, {"decoupling": "none"} | _tiny_fields())
    cfg.model.decoupling = "all"
    with pytest.raises(ConfigError, match="checkpoint .* has 'none'"):
        build_model_config(cfg, {"decoupling": "none"} | _tiny_fields(), "ckpt")


def _tiny_fields():
    from eve_megatron.models.eve.config import eve_config, model_fields

    fields = model_fields(eve_config("tiny"))
    fields.pop("decoupling")
    return fields


def test_trainable_sets():
    names = ["embedding.patch_embedding.conv1.weight", "embedding.word_embeddings.weight",
             "decoder.layers.0.vision_input_layernorm.weight",
             "decoder.layers.0.self_attention.vision_linear_qkv.bias",
             "decoder.layers.0.self_attention.linear_qkv.bias", "decoder.layers.1.vision_mlp.linear_fc1.weight",
             "decoder.layers.1.mlp.linear_fc2.weight", "output_layer.weight"]
    assert [is_trainable(n, "patch_embedding") for n in names] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert [is_trainable(n, "vision") for n in names] == [1, 0, 1, 1, 0, 1, 0, 0]
    assert all(is_trainable(n, "all") for n in names)


def test_warmup_fraction_and_decay_iters():
    cfg = parse_config(["--data-path", "x", "--train-iters", "200", "--lr-warmup-fraction", "0.03"])
    assert lr_schedule_iters(cfg) == (6, 200)
    cfg = parse_config(["--data-path", "x", "--train-samples", "1000", "--global-batch-size", "10",
                        "--lr-warmup-iters", "100"])
    with pytest.raises(ConfigError, match="warmup"):
        lr_schedule_iters(cfg)


def test_batch_stats_counts_image_text_and_padding():
    batch = make_batch(RefShape(), 3, 64, seed=4)
    stats = batch_stats(batch).tolist()
    seg = batch["segment_ids"].flatten()
    image = text = samples = 0
    for s in seg.unique():  # independent count: per segment, padding = no label and no image
        m = seg == s
        vis = batch["is_vision"].flatten()[m]
        if (batch["labels"].flatten()[m] != -100).any() or vis.any():
            samples += 1
            image += int(vis.sum())
            text += int((~vis).sum())
    assert stats == [image, text, samples, 3, 0]
    assert batch_stats({**batch, "corrupt_samples": 2})[4] == 2
    assert image > 0 and text > 0 and samples < len(seg.unique())
    assert batch_stats({**batch, "is_vision": torch.zeros_like(batch["is_vision"])})[0] == 0


def test_image_settings_come_from_the_data(tmp_path):
    """The image size and alpha rule recorded with checkpoints: the largest size over the
    datasets, their one alpha rule (mixed rules are an error; unrecorded means white)."""
    from types import SimpleNamespace

    from eve_megatron.data.indexed import IndexedDatasetWriter
    from eve_megatron.training.config import ConfigError
    from eve_megatron.training.data_setup import data_image_settings

    def dataset(name, image):
        w = IndexedDatasetWriter(str(tmp_path / name), {"image": image} if image else {})
        w.add(np.arange(1, 5), np.ones(4, dtype=np.int64), [])
        w.finalize()
        return str(tmp_path / name)

    def settings(*paths):
        return data_image_settings(SimpleNamespace(data=SimpleNamespace(data_path=list(paths))))

    a = dataset("a", {"max_size": 800, "alpha": "drop"})
    b = dataset("b", {"max_size": 1600, "alpha": "drop"})
    old = dataset("old", {"max_size": 800})
    assert settings("0.3", a, "0.7", b) == {"max_image_size": 1600, "alpha": "drop"}
    assert settings(old) == {"max_image_size": 800, "alpha": "white"}
    assert settings(dataset("text", None)) == {}
    with pytest.raises(ConfigError, match="alpha"):
        settings("1", a, "1", old)


def test_attention_backend_flag_reaches_the_model():
    base = ["--model-preset", "tiny", "--stage", "2", "--decoupling", "all", "--data-path", "x",
            "--train-iters", "1"]
    cfg = parse_config(base + ["--attention-backend", "flex"])
    assert build_model_config(cfg, None).attention_impl == "flex"
    assert build_model_config(parse_config(base), None).core_attention_impl == "auto"
    if not torch.cuda.is_available():
        cfg = parse_config(base + ["--attention-backend", "torch_varlen"])
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            build_model_config(cfg, None)
    with pytest.raises(ConfigError, match="transformer_engine"):
        parse_config(base + ["--attention-backend", "te"]).validate(world_size=1)


def test_a_skipped_step_logs_its_loss_as_skipped(megatron_world, capsys):
    from eve_megatron.models.eve import eve_config
    from eve_megatron.training.report import Reporter

    cfg = parse_config(["--model-preset", "tiny", "--data-path", "x", "--train-iters", "3",
                        "--log-interval", "1", "--no-progress"])
    reporter = Reporter(cfg, eve_config("tiny"), 3, 0)
    stats = torch.tensor([4.0, 60.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    reporter.add(1, stats, float("nan"), float("nan"), 1e-3, skipped=True)
    out = capsys.readouterr().out
    assert "loss skipped" in out and "lm-loss" not in reporter.last and "damaged" not in out
    reporter.add(2, stats + torch.tensor([0, 0, 0, 0, 3.0], dtype=torch.float64), 2.5, 1.0, 1e-3,
                 skipped=False)
    out = capsys.readouterr().out
    assert "loss 2.500000e+00" in out and reporter.last["lm-loss"] == 2.5
    assert "damaged samples skipped 3" in out and reporter.last["corrupt-samples"] == 3


def test_values_the_optimizer_cannot_hold_are_refused_up_front(tmp_path):
    base = ["--model-preset", "tiny", "--data-path", "x", "--train-iters", "1"]
    for flags, words in ((["--lr", "1e39"], r"lr=1e\+39 is not a finite float32"),
                         (["--clip-grad", "inf"], "clip_grad=inf"),
                         (["--lr", "nan"], "lr")):
        with pytest.raises(ConfigError, match=words):
            parse_config(base + flags).validate(world_size=1)
    from eve_megatron.data.tokenizer import load_tokenizer

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "notes.txt").write_text("no tokenizer here")
    with pytest.raises(ValueError, match=f"tokenizer folder {tmp_path / 'tok'} holds no usable"):
        load_tokenizer(str(tmp_path / "tok"))
