#!/usr/bin/env bash
# The GPU verification kit's run step, on the lent GPU machine, from the repository root,
# after the calls of .gpukit/plan.json brought .gpukit/call*/ (tools/gpu/prepare.py).
# Joins the pieces (sha256-checked), installs the carried wheels with --no-index, builds
# Transformer Engine's PyTorch extension when its sources came (timed), then runs, each
# time-boxed, and writes JSON/logs to $OUT (default /tmp/gpu_out):
#   env.json        GPU, torch, which attention backends and TE are present, install times
#   pytest_gpu.log  the gpu tests: every attention backend and TE bf16/FP8 vs the fp32 reference
#   bench_*.json    tools/bench/bench_train_step.py at EVE-7B widths (routed/dense/GPTModel)
#   train_*.log     20 trainer steps (torchrun, packed synthetic data): tokens/s, MFU
# Without a CUDA GPU it says so, writes {"gpu": false} and exits 3 (nothing else runs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
KIT=${KIT:-.gpukit}
BUDGET=${BUDGET:-360}          # seconds for the checks after installation
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  echo '{"gpu": false, "error": "no CUDA GPU present: the kit ran nothing"}' > "$OUT/env.json"
  echo "run.sh: no CUDA GPU present on this machine: the kit ran nothing" >&2
  exit 3
fi
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# 1. reassemble and install what the calls brought
mkdir -p "$KIT/all" "$KIT/wheels"
for f in "$KIT"/call*/*; do ln -sf "$(realpath "$f")" "$KIT/all/$(basename "$f")"; done
for m in "$KIT"/all/*.pieces.json; do
  [ -e "$m" ] && python3 tools/gpu/pieces.py join "$m" --out "$KIT/wheels" >/dev/null
done
for f in "$KIT"/all/*.whl "$KIT"/all/*.tar.gz; do [ -e "$f" ] && ln -sf "$(realpath "$f")" "$KIT/wheels/"; done
T0=$(date +%s)
if [ -f "$KIT/all/requirements.txt" ]; then
  python3 -m pip install -q --no-index --find-links "$KIT/wheels" \
    -r "$KIT/all/requirements.txt" >>"$OUT/install.log" 2>&1
fi
INSTALL_S=$(( $(date +%s) - T0 ))
if ls "$KIT"/wheels/eve_megatron-*cp312*.whl >/dev/null 2>&1; then   # our C++ extension
  python3 -c "import zipfile, glob; z = zipfile.ZipFile(sorted(glob.glob('$KIT/wheels/eve_megatron-*cp312*.whl'))[-1]); [z.extract(n, '.') for n in z.namelist() if n.startswith('eve_megatron/_C')]"
else
  python3 setup.py -q build_ext --inplace >>"$OUT/install.log" 2>&1
fi
TE_S=skipped
if ls "$KIT"/wheels/transformer_engine_cu13-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links "$KIT/wheels" --no-deps \
    "$KIT"/wheels/transformer_engine_cu13-*.whl "$KIT"/wheels/transformer_engine-*.whl >>"$OUT/install.log" 2>&1
  T0=$(date +%s)
  timeout 900 env MAX_JOBS=16 NVTE_FRAMEWORK=pytorch python3 -m pip install -q \
    --no-index --find-links "$KIT/wheels" --no-build-isolation --no-deps \
    "$KIT"/wheels/transformer_engine_torch-*.tar.gz >>"$OUT/install.log" 2>&1
  TE_S=$(( $(date +%s) - T0 ))
fi
HAVE_TE=$(python3 -c "import transformer_engine.pytorch" 2>/dev/null && echo 1 || echo 0)
START=$(date +%s)   # the check budget starts after installation

# 2. environment
python3 - "$INSTALL_S" "$TE_S" >"$OUT/env.json" <<'EOF'
import json, subprocess, sys, torch
from eve_megatron.models.eve.core_attention import backend_available
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "install_seconds": sys.argv[1], "te_extension_build_seconds": sys.argv[2],
                  "backends": {b: backend_available(b, "transformer_engine")
                               for b in ("te", "flash_attn", "torch_varlen", "flex", "sdpa")}}))
EOF
cat "$OUT/env.json"

# 3. correctness on the GPU: every backend (and TE bf16/FP8) against the fp32 reference
timeout $(( $(left) / 3 )) python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/unit/test_gpu_model.py tests/distributed/test_launch.py >"$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"

# 4. the training step at EVE-7B widths (2 layers: three trainers must fit at once; below
#    100 GiB of GPU memory (H100) a 32k vocabulary instead of 152k keeps them in)
VOCAB=$(python3 -c "import torch; print('' if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30 else '--vocab 32768')")
BACKENDS="torch_varlen flex sdpa"
[ "$HAVE_TE" = 1 ] && BACKENDS="te $BACKENDS"
IMPL=$([ "$HAVE_TE" = 1 ] && echo transformer_engine || echo local)
timeout $(( $(left) / 2 )) python3 tools/bench/bench_train_step.py --preset eve-7b-hd-v2.0 \
  --layers 2 $VOCAB --seq 4096 --micro-batch 1 --global-batch 2 --rounds 3 --bf16 --peak-tflops 989 \
  --transformer-impl "$IMPL" --attention $BACKENDS --out "$OUT/bench_bf16.json" \
  >"$OUT/bench_bf16.log" 2>&1
grep -E "routed/dense" "$OUT/bench_bf16.log"
if [ "$HAVE_TE" = 1 ]; then
  timeout $(( $(left) / 2 )) python3 tools/bench/bench_train_step.py --preset eve-7b-hd-v2.0 \
    --layers 2 $VOCAB --seq 4096 --micro-batch 1 --global-batch 2 --rounds 3 --bf16 --fp8-format hybrid \
    --peak-tflops 989 --transformer-impl transformer_engine --attention te \
    --out "$OUT/bench_fp8.json" >"$OUT/bench_fp8.log" 2>&1
  grep -E "routed/dense" "$OUT/bench_fp8.log"
fi

# 5. twenty trainer steps through the real entry point (packed synthetic data, logged MFU)
DATA=/tmp/gpu_kit_data
python3 -c "import sys; sys.path.insert(0, 'tools/bench'); import bench_train_step as b; b.write_dataset('$DATA', 4096, n=400)"
for backend in $BACKENDS; do
  [ "$(left)" -gt 30 ] || break
  timeout $(( $(left) - 10 )) torchrun --nproc-per-node 1 -m eve_megatron.pretrain \
    --model-preset eve-7b-hd-v2.0 --num-layers 4 --decoupling all --stage 2 --bf16 \
    --transformer-impl "$IMPL" --attention-backend "$backend" --data-path "$DATA" \
    --seq-length 4096 --micro-batch-size 1 --global-batch-size 2 --train-iters 20 \
    --lr 1e-5 --log-interval 5 --num-workers 2 --peak-tflops 989 >"$OUT/train_$backend.log" 2>&1
  grep -E "iteration +20" "$OUT/train_$backend.log" | tail -1
done

# 6. one JSON of everything (the figures docs/gpu_results.md records)
python3 - "$OUT" >"$OUT/results.json" <<'EOF'
import glob, json, os, re, sys
out = sys.argv[1]
def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""
result = {"env": json.loads(read("env.json") or "{}"),
          "pytest_gpu": (read("pytest_gpu.log").strip().splitlines() or [""])[-1]}
for name in ("bench_bf16.json", "bench_fp8.json"):
    if read(name):
        result[name[:-5]] = json.loads(read(name))["results"]
for path in sorted(glob.glob(os.path.join(out, "train_*.log"))):
    lines = [l for l in open(path) if re.search(r"iteration +\d+", l)]
    result[os.path.basename(path)[:-4]] = lines[-1].strip() if lines else "no iteration logged"
print(json.dumps(result, indent=1))
EOF
echo "run.sh: done in $(( $(date +%s) - START )) s of a $BUDGET s budget; results in $OUT/results.json"
