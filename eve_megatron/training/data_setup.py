"""The training stream of one rank: packed rows -> micro-batches of each optimizer step.

Every rank of a data-parallel replica (all TP ranks, all pipeline stages) reads the same
micro-batches; the model chunks of one rank (virtual pipeline) share them through
:class:`StepData`, which fetches each micro-batch once and keeps it only until every
chunk has used it.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch
from megatron.core import parallel_state as ps

from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
from eve_megatron.data.loader import build_data_loader
from eve_megatron.hf.evev1_image_rules import BASE_SIZE as TEACHER_SIZE
from eve_megatron.training.config import ConfigError, TrainConfig

STAT_NAMES = ("image_tokens", "text_tokens", "samples", "rows", "corrupt_samples")
"""What :func:`batch_stats` counts, in order."""


def build_train_stream(cfg: TrainConfig, consumed_samples: int,
                       model_config=None) -> Iterator[Dict]:
    """Micro-batches of this data-parallel rank, starting at row ``consumed_samples``.

    The loader's iterator is created without drawing from the global torch generator,
    so a resumed run's RNG stream equals the uninterrupted one. With ``model_config`` the
    data must suit the model (pixel block, EVEv1 teacher images): else a ConfigError.
    """
    t, d = cfg.training, cfg.data
    total = t.iterations * t.global_batch_size
    try:
        dataset = EVEPackedDataset(PackedDataConfig(
            data_path=list(d.data_path), seq_length=d.seq_length, num_samples=total,
            seed=t.seed, shuffle_window=d.shuffle_window, corrupt_samples=d.corrupt_samples))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if model_config is not None:
        check_data_fits_model(dataset, model_config)
    _describe(dataset)
    loader = build_data_loader(
        dataset, consumed_samples, t.micro_batch_size,
        data_parallel_rank=ps.get_data_parallel_rank(),
        data_parallel_size=ps.get_data_parallel_world_size(), num_workers=d.num_workers)
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def check_data_fits_model(dataset: EVEPackedDataset, model_config) -> None:
    """The datasets' pixel block is the model's (``patch_stride * dense_stride``), EVEv1 data
    has teacher images of the teacher's size, and other families' data has none."""
    if not hasattr(model_config, "block_size"):  # not an EVE model (a benchmark's GPTModel)
        return
    block, family = model_config.block_size, type(model_config).FAMILY
    has_images = any(len(ds.field("image_h")) for ds in dataset.datasets)
    if has_images and dataset.block != block:
        raise ConfigError(f"data: the datasets cut images into {dataset.block}-pixel blocks, the "
                          f"model ({family}) takes {block}: preprocess with --model-family {family}")
    if family == "evev1" and has_images and not dataset.teacher:
        raise ConfigError("data: EVEv1 training needs each image's teacher image: preprocess "
                          "with --model-family evev1")
    size = getattr(model_config, "teacher_image_size", None)
    if family != "evev1" and dataset.teacher:
        raise ConfigError(f"data: EVEv1 datasets (with teacher images) do not suit a {family} "
                          "model")
    if dataset.teacher and size is not None and size != TEACHER_SIZE:
        raise ConfigError(f"data: the teacher images are {TEACHER_SIZE} pixels, the model's "
                          f"teacher takes {size}")


def check_vocab(cfg: TrainConfig, vocab_size: int) -> None:
    """Every token id of the tokenizer and of each dataset must fit ``vocab_size``."""
    from eve_megatron.data.indexed import IndexedDataset
    from eve_megatron.data.packing import parse_data_path
    from eve_megatron.data.tokenizer import load_tokenizer

    try:
        if cfg.data.tokenizer_model:
            n = load_tokenizer(cfg.data.tokenizer_model).vocab_size
            if n > vocab_size:
                raise ConfigError(f"data: tokenizer {cfg.data.tokenizer_model} has {n} tokens, "
                                  f"more than the model's vocab_size {vocab_size}")
        for _, prefix in parse_data_path(list(cfg.data.data_path)):
            n = IndexedDataset(prefix).metadata.get("vocab_size") or 0
            if n > vocab_size:
                raise ConfigError(f"data: {prefix} was tokenised with {n} tokens, more than "
                                  f"the model's vocab_size {vocab_size}")
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data: {exc}") from None


def data_image_settings(cfg: TrainConfig) -> dict:
    """How the training images were prepared (``checkpointing.IMAGE_KEYS``), from each
    dataset's metadata: the largest AnyRatio size and the one alpha rule. Datasets written
    before the alpha rule was recorded composited onto white."""
    from eve_megatron.data.indexed import IndexedDataset
    from eve_megatron.data.packing import parse_data_path

    sizes, alphas = [], {}
    try:
        for _, prefix in parse_data_path(list(cfg.data.data_path)):
            image = IndexedDataset(prefix).metadata.get("image") or {}
            if "max_size" in image:
                sizes.append(int(image["max_size"]))
                alphas[prefix] = image.get("alpha", "white")
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if len(set(alphas.values())) > 1:
        raise ConfigError(f"data: the datasets were preprocessed with different alpha rules "
                          f"{alphas}; training and inference need one (preprocess --alpha)")
    if not sizes:
        return {}
    return {"max_image_size": max(sizes), "alpha": next(iter(alphas.values()))}


def _describe(dataset: EVEPackedDataset) -> None:
    """Print, on rank 0, each dataset's size and how many rows one epoch packs into."""
    if torch.distributed.get_rank() != 0:
        return
    for (weight, prefix), ds, stream in zip(dataset.config.blend, dataset.datasets,
                                            dataset.streams):
        stream.ensure(1)
        print(f"data: {prefix} (weight {weight:.3f}): {len(ds):,} samples, one epoch = "
              f"{len(stream.epochs[0]):,} rows of {dataset.config.seq_length} tokens", flush=True)


@torch.no_grad()
def batch_stats(batch: Dict) -> torch.Tensor:
    """``[image tokens, text tokens, samples, rows, corrupt samples skipped]`` of a
    micro-batch (float64).

    Text tokens are the non-image tokens of real samples; the padding segment at the end
    of a row (no supervised label, no image) counts as neither.
    """
    cu = batch["cu_seqlens"].long()
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens)  # [b*s] segment of each token
    useful = (batch["loss_mask"].flatten() > 0) | batch["is_vision"].flatten()
    hits = torch.zeros(len(lens)).scatter_add_(0, seg, useful.float())
    real = hits > 0
    image = int(batch["is_vision"].sum())
    tokens = int(lens[real].sum())
    return torch.tensor([image, tokens - image, int(real.sum()), batch["tokens"].shape[0],
                         batch.get("corrupt_samples", 0)], dtype=torch.float64)


class StepData:
    """The ``num_microbatches`` micro-batches of one step, shared by ``num_chunks`` chunks."""

    def __init__(self, source: Iterator[Dict], num_microbatches: int, num_chunks: int = 1):
        self.source, self.n, self.num_chunks = source, num_microbatches, num_chunks
        self.cache: Dict[int, Dict] = {}
        self.used = [0] * num_microbatches
        self.fetched = 0
        self.stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)

    def _fetch(self, j: int) -> None:
        while self.fetched <= j:
            try:
                batch = next(self.source)
            except StopIteration:
                raise RuntimeError("the data stream ended before the last iteration; "
                                   "check --train-iters/--train-samples") from None
            self.stats += batch_stats(batch)
            self.cache[self.fetched] = batch
            self.fetched += 1

    def _get(self, j: int) -> Dict:
        self._fetch(j)
        batch = self.cache[j]
        self.used[j] += 1
        if self.used[j] == self.num_chunks:
            del self.cache[j]
        return batch

    def prefetch(self) -> List[Dict]:
        """Fetch every micro-batch of the step now (before any is handed out)."""
        if any(self.used):
            raise RuntimeError("prefetch() must come before the step's micro-batches are used")
        self._fetch(self.n - 1)
        return [self.cache[j] for j in range(self.n)]

    def _iter(self) -> Iterator[Dict]:
        for j in range(self.n):
            yield self._get(j)

    def iterators(self) -> List[Iterator[Dict]]:
        """One iterator per model chunk, each yielding the step's micro-batches in order."""
        return [self._iter() for _ in range(self.num_chunks)]
