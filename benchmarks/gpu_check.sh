#!/usr/bin/env bash
# gnorm on one CUDA GPU in one go, under 6 minutes: the tests, the accuracy table, the structure
# of XLA's compiled programs, the device-time benchmark and the drop-in model benchmark.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else gpu_check_out/
#
# gnorm runs from this tree (PYTHONPATH: the repository and benchmarks/) with the machine's JAX
# (CUDA build), flax, equinox, optax, torch and pytest; nothing is installed. Each step has a
# hard time limit, is recorded in summary.txt, and does not stop the next ones:
#   start     nvidia-smi, versions, JAX's devices; stops here unless JAX's backend is the GPU
#   plan      xla_gpu_plan.py on the device, in the background from the start (it compiles)
#   accuracy  accuracy.py, in the background from the start (a few tiny programs)
#   tests     python -m pytest -q -x on the GPU, limit GNORM_GPU_CHECK_TESTS_S (default 100 s);
#             its result is recorded but never fails the script
#   bench     gpu_bench.py, its budget what the total leaves (at most 200 s)
#   drop_in   drop_in.py, the default model with 15 rounds of 40 ms, limit 60 s
# Writes 7 files in OUT_DIR: summary.txt (versions, devices, each step's status, time and last
# lines, the accuracy table, the benchmark's summary), pytest.log, steps.log (the steps' output,
# xla_gpu_plan.md and the drop-in report), gpu_bench.md, gpu_bench.json, xla_gpu_plan.json,
# drop_in.json. Exits non-zero if JAX sees no GPU, or at the end if a step other than the
# tests failed.
#
# GNORM_GPU_CHECK_DRY_RUN=1: every step on the CPU with tiny settings (CI runs it).
# GNORM_GPU_CHECK_TESTS: pytest's arguments instead of the default files;
# GNORM_GPU_CHECK_TOTAL_S: the seconds the whole check aims at (default 345);
# GNORM_GIT_REVISION: the commit, where the tree was copied without .git; PYTHON: the interpreter.
set -euo pipefail
export PYTHONUNBUFFERED=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
DRY="${GNORM_GPU_CHECK_DRY_RUN:-0}"
TOTAL_S="${GNORM_GPU_CHECK_TOTAL_S:-345}"
TESTS_S="${GNORM_GPU_CHECK_TESTS_S:-100}"
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# The suite's reproducible property tests (hypothesis' "ci" profile); skips allowed here.
export CI="${CI:-1}" GNORM_ALLOW_SKIPS=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  TESTS=(tests/test_matrix_xla.py -k "TestXla and test_values and 4x12-G3")
  QUICK=(--quick)
  DROP_IN=(--quick)
else
  export JAX_PLATFORMS=cuda  # tests/conftest.py would default it to cpu
  # The numerical tests, most important first; the second-order, hessian, derivative-comparison
  # and property tests (many compilations each) are left out.
  TESTS=(tests/test_matrix_xla.py tests/test_matrix_pallas.py tests/test_matrix_pallas_one_pass.py
         tests/test_matrix_xla_gpu.py
         tests/test_gpu_plan_structure.py tests/test_padding.py tests/test_features.py
         -k "not second_order and not hessian and not property and not derivatives_match")
  QUICK=()
  DROP_IN=(--rounds 15 --sample-ms 40)
fi
if [[ -n "${GNORM_GPU_CHECK_TESTS:-}" ]]; then read -r -a TESTS <<<"$GNORM_GPU_CHECK_TESTS"; fi

SUMMARY="$OUT_DIR/summary.txt"
STEPS_LOG="$OUT_DIR/steps.log"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
START=$SECONDS
FAILED=()

say "# gnorm GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), dry run: $DRY"
say "repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null \
  || echo "no git; GNORM_GIT_REVISION=${GNORM_GIT_REVISION:-unset}")), out: $OUT_DIR"
if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | tee -a "$SUMMARY" || true; fi
if ! "$PY" - "$DRY" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "equinox",
             "optax", "torch", "triton", "numpy", "pytest", "hypothesis"):
  try:
    print(dist, md.version(dist))
  except md.PackageNotFoundError:
    print(dist, "not installed")
import jax
try:
  backend, devices = jax.default_backend(), jax.devices()
except Exception as e:  # noqa: BLE001 - no device of the platform asked for
  sys.exit(f"FAIL: JAX sees no GPU: {type(e).__name__}: {e}")
print("jax backend", backend, "devices", devices, "device_kind", devices[0].device_kind)
if backend != ("cpu" if sys.argv[1] == "1" else "gpu"):
  sys.exit(f"FAIL: JAX sees no GPU: its default backend is {backend!r}")
EOF
then
  say "== FAILED: JAX sees no GPU (GNORM_GPU_CHECK_DRY_RUN=1 runs this on the CPU)"
  exit 1
fi
: >"$STEPS_LOG"

# run NAME LIMIT_S COMMAND...: COMMAND killed after LIMIT_S seconds, its output in
# $WORK/NAME.out; the status in $WORK/NAME.rc.
run() {
  local name=$1 limit=$2 rc=0
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>&1 || rc=$?
  echo "$rc" >"$WORK/$name.rc"
}
# record NAME LOG T0: the step's output appended to LOG, its last lines and status to the summary.
record() {
  local name=$1 log=$2 rc status=ok
  rc=$(cat "$WORK/$name.rc")
  { echo "== $name"; cat "$WORK/$name.out"; echo; } >>"$log"
  say ""
  tail -n 12 "$WORK/$name.out" | tee -a "$SUMMARY"
  if [[ $rc == 124 || $rc == 137 ]]; then status="cut at its time limit"; fi
  if [[ $rc != 0 && $status == ok ]]; then status="FAILED (exit $rc)"; fi
  say "== $name: $status, $(($3 - START))-$((SECONDS - START)) s"
  if [[ $rc != 0 && $name != tests ]]; then FAILED+=("$name"); fi
}
fold() {  # fold FILE: a report appended to steps.log
  if [[ -f "$1" ]]; then { echo "== $(basename "$1")"; cat "$1"; echo; } >>"$STEPS_LOG"; fi
}

# Beside the tests: they compile, or run a few tiny programs, and keep GPU memory to themselves.
T_BG=$SECONDS
BG=(env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY")
run plan 150 "${BG[@]}" benchmarks/xla_gpu_plan.py ${QUICK[@]+"${QUICK[@]}"} --out "$WORK/plan" &
PLAN_PID=$!
run accuracy 60 "${BG[@]}" benchmarks/accuracy.py --out "$WORK" &
ACCURACY_PID=$!

T0=$SECONDS
# A newer JAX may deprecate what the suite uses: shown, not an error here (pyproject.toml's
# filterwarnings makes warnings errors). -p no:benchmark: pytest-benchmark warns under xdist.
run tests "$TESTS_S" "$PY" -m pytest -q -x -p no:cacheprovider -p no:benchmark \
  -W default::DeprecationWarning -W default::PendingDeprecationWarning \
  -W default::FutureWarning "${TESTS[@]}"
cp "$WORK/tests.out" "$OUT_DIR/pytest.log"
record tests /dev/null "$T0"
wait "$ACCURACY_PID" || true
record accuracy "$STEPS_LOG" "$T_BG"
wait "$PLAN_PID" || true
record plan "$STEPS_LOG" "$T_BG"
fold "$WORK/plan/xla_gpu_plan.md"
if [[ -f "$WORK/plan/xla_gpu_plan.json" ]]; then cp "$WORK/plan/xla_gpu_plan.json" "$OUT_DIR/"; fi

# What the total leaves after the drop-in step (60 s) and 15 s for the last reports.
BUDGET=$((TOTAL_S - (SECONDS - START) - 75))
if ((BUDGET > 200)); then BUDGET=200; fi
if ((BUDGET < 30)); then BUDGET=30; fi
T0=$SECONDS
run bench $((BUDGET + 40)) "$PY" benchmarks/gpu_bench.py ${QUICK[@]+"${QUICK[@]}"} \
  --budget-s "$BUDGET" --out "$OUT_DIR"
record bench "$STEPS_LOG" "$T0"

T0=$SECONDS
run drop_in 60 "$PY" benchmarks/drop_in.py "${DROP_IN[@]}" --no-progress --out "$WORK/drop_in"
record drop_in "$STEPS_LOG" "$T0"
fold "$WORK/drop_in/latest.md"
if [[ -f "$WORK/drop_in/latest.json" ]]; then cp "$WORK/drop_in/latest.json" "$OUT_DIR/drop_in.json"; fi

say ""
say "== total $((SECONDS - START)) s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if [[ -f "$OUT_DIR/gpu_bench.md" ]]; then  # last on stdout: the benchmark's summary
  sed -n '/^## Summary/,/^## Not measured/{/^## Not/!p}' "$OUT_DIR/gpu_bench.md" | tee -a "$SUMMARY"
fi
if ((${#FAILED[@]})); then
  say "== FAILED: ${FAILED[*]}"
  exit 1
fi
say "== all steps passed (tests: see above)"
