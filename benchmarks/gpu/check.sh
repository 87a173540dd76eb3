#!/usr/bin/env bash
# The GPU verification of dynsplit-sglang, in one go (about 8 minutes on one H100/H200):
#   1. preflight: CUDA torch, SGLang 0.5.23, pytest in this environment; the package installed
#   2. tests/kernels on the GPU: compiled Triton kernels against the core twins, fp16 and bf16,
#      and CUDA-graph capture/replay of the decode wrapper (plan refreshed in place)
#   3. the kernel benchmark, short settings (benchmarks/kernels/run.py --quick, CUDA only)
#   4. a short compressed serving run with decode CUDA graphs on, against --disable-cuda-graph
#      (benchmarks/gpu/serve_check.py: identical greedy outputs, graph replays, compression)
# When all pass, decode graphs may be declared verified: add "decode" to VERIFIED_PHASES in
# dynsplit_sglang/graph_support.py and record this run's summary in CHANGELOG.md.
#
# usage: benchmarks/gpu/check.sh [--dry-run] [--model DIR] [--out DIR]
#   PYTHON (default python3): the SGLang 0.5.23 CUDA environment's interpreter
#   --model: a local model folder (default .cache/models/tiny-llama, `make models` builds it)
#   --out: where results and logs go (default $OUT, else benchmarks/gpu/results)
set -euo pipefail
cd "$(dirname "$0")/../.."

DRY=0
MODEL=.cache/models/tiny-llama
RESULTS=${OUT:-benchmarks/gpu/results}
PY=${PYTHON:-python3}
BUDGET_S=480
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --model) MODEL=$2; shift ;;
    --out) RESULTS=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

STEP=0
step() {  # step SECONDS DESCRIPTION -- COMMAND...
  local limit=$1 what=$2; shift 3
  STEP=$((STEP + 1))
  echo "[$STEP] $what (limit ${limit}s): $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "[$STEP] done in $((SECONDS - t0))s (total $SECONDS s of $BUDGET_S)"
}

[ "$DRY" = 1 ] && echo "dry run: nothing is executed"
[ "$DRY" = 1 ] || mkdir -p "$RESULTS"
step 30 "preflight: CUDA torch, SGLang 0.5.23, pytest" -- "$PY" -c \
  "import torch, sglang, pytest; assert torch.cuda.is_available(), 'no CUDA device'; \
assert sglang.__version__.startswith('0.5.23'), sglang.__version__; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), 'sglang', sglang.__version__)"
step 45 "install the package into this environment (no dependencies)" -- \
  "$PY" -m pip install --no-deps --no-build-isolation --quiet -e .
step 135 "kernel tests on the GPU (bf16, graph capture)" -- \
  env DYNSPLIT_TEST_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
  --junitxml "$RESULTS/kernels-junit.xml"
step 90 "kernel benchmark, short settings" -- \
  "$PY" benchmarks/kernels/run.py --quick --device cuda --contexts 8192 32768 \
  --out "$RESULTS/kernels-gpu.json"
step 180 "compressed serving with decode CUDA graphs on vs off" -- \
  "$PY" benchmarks/gpu/serve_check.py --model "$MODEL" --out "$RESULTS/serve-gpu.json"
if [ "$DRY" = 0 ] && [ "$SECONDS" -gt "$BUDGET_S" ]; then
  echo "check.sh: all steps passed but took ${SECONDS}s, over the ${BUDGET_S}s budget" >&2
  exit 1
fi
if [ "$DRY" = 1 ]; then
  echo "check.sh: ${STEP} steps planned"
else
  echo "check.sh: ${STEP} steps passed in ${SECONDS}s; results in $RESULTS"
fi
