#!/usr/bin/env bash
# GPU tests and benchmarks in one call (for a lent GPU machine with no network).
# Run from the repository root. Wheels in .whl/ (e.g. megatron-core) are installed to
# /tmp/site first; results go to $OUT (default /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mcore', m.__version__)"
  python3 -c "import importlib.util as u; print({k: u.find_spec(k) is not None for k in ('transformer_engine', 'flash_attn', 'apex')})"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_gpu_model.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -4
bench() { python3 tools/bench/bench_routing.py --device cuda --dtype bf16 "$@" 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"; }
bench --hidden 2048 --heads 16 --kv-heads 4 --ffn 5632 --vocab 32768 --layers 8 --seq 4096 --batch 2 --iters 10 --warmup 3
bench --preset qwen2.5-1.5b --layers 28 --seq 4096 --batch 2 --iters 8 --warmup 3
bench --preset eve-7b-hd-v2.0 --layers 6 --seq 4096 --batch 1 --iters 8 --warmup 3
bench --preset qwen2.5-1.5b --layers 28 --seq 4096 --batch 2 --iters 8 --warmup 3 --ce-fusion
tail -3 "$OUT/bench.err"
