#!/usr/bin/env bash
# gnorm on one CUDA GPU, in one go (issues 19 and 20): the GPU tests, the accuracy table,
# the structure of XLA's GPU programs, the Pallas kernels' tile sweep, the device-time
# benchmark, the drop-in model benchmark, and every target. Under 6 minutes on an H200 from
# a bare machine.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else gpu_check_out/
#
# Runs gnorm from this source tree (PYTHONPATH = the repository root, nothing installed)
# with the JAX (CUDA build), flax, equinox, optax, torch, pytest and hypothesis the
# machine has; dm-haiku is optional (the benchmark skips it). Steps, each with a time
# limit (what each should take on an H200: benchmarks/README.md, "The GPU check"):
#   1. tests (pytest, on the GPU), limit 100 s, a deadline at 75 s after which the
#      remaining tests are skipped with the reason (gnorm_bench/device_pytest_deadline.py)
#   2. accuracy table (benchmarks/accuracy.py), limit 45 s
#   3. XLA's GPU programs (benchmarks/xla_gpu_plan.py), limit 150 s, run in the
#      background beside steps 1 and 2 (it only compiles; after them, limit 90 s, where
#      the GPU's compute mode is not Default)
#   4. Pallas tile sweep (benchmarks/pallas_sweep.py), budget 60 s, limit 100 s
#   5. device-time benchmark (benchmarks/gpu_bench.py), its budget what the total leaves
#      (at most 150 s), limit budget + 45 s
#   6. drop-in model benchmark (benchmarks/drop_in.py), limit 60 s
#   7. every target of issues 19 and 20 (gpu_bench.py --summarize), limit 30 s
# Writes at most 8 files (what the device machine returns), all directly in OUT_DIR:
#   summary.txt    versions, devices, nvidia-smi, each step's status, time and last lines,
#                  the accuracy table, the sweep's decisions, the targets
#   pytest.log     the tests
#   steps.log      the full output of steps 3-6, with xla_gpu_plan.md and pallas_sweep.md
#   gpu_bench.md, gpu_bench.json   the device-time benchmark
#   drop_in.json   drop_in.py's latest.json
#   xla_gpu_plan.json   xla_gpu_plan.py's results (its report is in steps.log)
#   tuning_table.json   the sweep's candidate table (commit it with
#                  `python benchmarks/pallas_sweep.py --install OUT_DIR/tuning_table.json`)
# Exits non-zero at once if JAX sees no GPU, and at the end if any step failed (a failing
# step does not stop the later ones: one GPU session gets them all).
#
# GNORM_GPU_CHECK_DRY_RUN=1 runs every step on the CPU with tiny settings
# (tests/test_benchmark.py does, so that the script cannot rot).
# GNORM_GPU_CHECK_TESTS: pytest's arguments instead of the default files;
# GNORM_GPU_CHECK_TOTAL_S: the seconds the whole check aims at (default 345);
# GNORM_GPU_CHECK_SWEEP_S: the tile sweep's budget (default 60); GNORM_GIT_REVISION: the
# commit, where the tree was copied without .git (the sweep's table and the benchmark's
# report record it); PYTHON: the interpreter.
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
DRY="${GNORM_GPU_CHECK_DRY_RUN:-0}"
TOTAL_S="${GNORM_GPU_CHECK_TOTAL_S:-345}"
SWEEP_S="${GNORM_GPU_CHECK_SWEEP_S:-60}"
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# Reproducible property tests (tests/conftest.py loads hypothesis' "ci" profile); the test
# step allows the skips of its deadline (GNORM_ALLOW_SKIPS), which CI itself fails.
export CI="${CI:-1}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

# tests/conftest.py defaults JAX_PLATFORMS to cpu: name the platform explicitly.
if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # Enough to prove each step's plumbing; the suite itself runs the rest.
  TESTS=(tests/test_group_norm.py -k "float32_matches_reference_on_standard_normal and 12")
  BENCH=(--quick)
  PLAN=(--quick)
  SWEEP=(--quick)
  DROP_IN=(--quick)
else
  export JAX_PLATFORMS=cuda
  # The numerical tests, most important first (the deadline cuts the last ones): the
  # default path (on a GPU, the GPU's own plan), the Pallas kernels (Triton on the GPU:
  # forward, backward against float64, determinism), padding masks (the GPU plan's
  # two-pass form), the GPU plan's own tests (outliers at its shifts, options), then the
  # fused options. Left out: second-order derivative checks, hessians, derivative
  # comparisons and property tests (many compilations each; the derivatives of order two
  # are plain JAX on every platform), and the files that check CPU-compiled programs,
  # simulated CPU devices or the API. 239 tests of 4 of these files took 170 s on an H200.
  TESTS=(tests/test_group_norm.py tests/test_pallas.py tests/test_padding.py
         tests/test_gpu_plan.py tests/test_features.py
         -k "not second_order and not hessian and not property and not derivatives_match")
  BENCH=()  # (empty arrays are expanded as ${A[@]+"${A[@]}"}: bash < 4.4 and set -u)
  PLAN=()
  SWEEP=()
  # The default model (3 blocks, width 128, (4, 32, 32, 128)), fewer and shorter rounds.
  DROP_IN=(--rounds 15 --sample-ms 40)
fi
if [[ -n "${GNORM_GPU_CHECK_TESTS:-}" ]]; then read -r -a TESTS <<<"$GNORM_GPU_CHECK_TESTS"; fi

SUMMARY="$OUT_DIR/summary.txt"
STEPS_LOG="$OUT_DIR/steps.log"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
START=$SECONDS
FAILED=()
TIMES=()

say "# gnorm GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), dry run: $DRY"
say "repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "no git; GNORM_GIT_REVISION=${GNORM_GIT_REVISION:-unset}")), out: $OUT_DIR"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi 2>&1 | tee -a "$SUMMARY" || say "nvidia-smi failed"
else
  say "nvidia-smi: not found"
fi

# Versions and devices; stops here unless JAX's default backend is the GPU.
if ! "$PY" - "$DRY" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import importlib.metadata as md
import platform
import sys

print("python", platform.python_version(), sys.executable)
for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "equinox",
             "optax", "dm-haiku", "torch", "triton", "numpy", "ml_dtypes", "pytest",
             "hypothesis"):
  try:
    print(f"{dist} {md.version(dist)}")
  except md.PackageNotFoundError:
    print(f"{dist}: not installed")
import jax  # noqa: E402

try:
  backend, devices = jax.default_backend(), jax.devices()
except Exception as e:  # noqa: BLE001 - JAX 0.10 raises a bare AssertionError here
  sys.exit(f"FAIL: JAX sees no GPU: {type(e).__name__} {e}")
print("jax backend", backend, "devices", devices, "device_kind", devices[0].device_kind)
want = "cpu" if sys.argv[1] == "1" else "gpu"
if backend != want:
  sys.exit(f"FAIL: JAX's default backend is {backend!r}, not {want!r}")
EOF
then
  say "== FAILED: JAX sees no GPU (GNORM_GPU_CHECK_DRY_RUN=1 runs this on the CPU)"
  exit 1
fi

: >"$STEPS_LOG"
: >"$OUT_DIR/pytest.log"  # record_log appends: a rerun must not pile onto the last run's
# Earlier versions of this script wrote xla_gpu_plan.md here (now in steps.log): a stale
# copy would count against the 8 files.
rm -f "$OUT_DIR/xla_gpu_plan.md"

# step NAME LOG LIMIT_S COMMAND...: runs COMMAND, killed after LIMIT_S seconds (a hang
# must not eat the GPU session: the later steps still run). LOG is the summary, or a log
# that gets the whole output appended (the summary gets its last lines); records the
# status and time, and goes on.
step() {
  local name=$1 log=$2 limit=$3 t0=$SECONDS rc=0
  shift 3
  if command -v timeout >/dev/null; then set -- timeout --kill-after=10 "$limit" "$@"; fi
  say ""
  say "== $name: $(printf '%q ' "$@")"
  if [[ "$log" == "$SUMMARY" ]]; then
    "$@" 2>&1 | tee -a "$SUMMARY" || rc=$?
  else
    "$@" >"$WORK/step.out" 2>&1 || rc=$?
    record_log "$name" "$log" "$WORK/step.out" "$*"
  fi
  record "$name" "$limit" "$rc" "$t0"
}

# record_log NAME LOG OUTPUT COMMAND: appends a step's output to LOG, its end to the summary.
record_log() {
  { echo "== $1: $4"; cat "$3"; echo; } >>"$2"
  tail -n 12 "$3" | tee -a "$SUMMARY"
}

# record NAME LIMIT_S RC T0: a step's status and time.
record() {
  local status=ok
  if [[ $3 == 124 || $3 == 137 ]]; then
    status="FAILED (no result after $2 s)"
  elif [[ $3 != 0 ]]; then
    status="FAILED (exit $3)"
  fi
  say "== $1: $status in $((SECONDS - $4)) s"
  TIMES+=("$1 $((SECONDS - $4)) s")
  if [[ $3 != 0 ]]; then FAILED+=("$1"); fi
}

# 3. XLA's GPU programs compiles ~140 programs and runs none: it runs beside steps 1 and 2
# (the host has cores to spare), without preallocating GPU memory, so that its minute or
# two of compiling costs the check no time of its own. Not where the GPU takes one
# process at a time (a compute mode other than Default): then after step 2.
PLAN_NAME="XLA's GPU programs (benchmarks/xla_gpu_plan.py)"
# Its report goes into steps.log, its json into OUT_DIR (fold, below): 8 files at most.
mkdir -p "$WORK/plan"
PLAN_CMD=("$PY" benchmarks/xla_gpu_plan.py ${PLAN[@]+"${PLAN[@]}"} --out "$WORK/plan")
MODE="$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -n 1 || true)"
PLAN_PID=""
if [[ "$DRY" == 1 || "$MODE" == "Default" ]]; then
  PLAN_T0=$SECONDS
  BG=(env XLA_PYTHON_CLIENT_PREALLOCATE=false "${PLAN_CMD[@]}")
  if command -v timeout >/dev/null; then BG=(timeout --kill-after=10 150 "${BG[@]}"); fi
  say ""
  say "== $PLAN_NAME, in the background: $(printf '%q ' "${BG[@]}")"
  "${BG[@]}" >"$WORK/plan.out" 2>&1 &
  PLAN_PID=$!
else
  say "GPU compute mode '${MODE:-unknown}': $PLAN_NAME runs after step 2"
fi

# 1. A newer JAX may deprecate what the suite uses: shown in the log, not fatal here
# (pyproject.toml turns every warning into an error). No `-n`: pytest-xdist with
# pytest-benchmark installed warns, an error under -W error; -p no:benchmark as well.
step "tests (pytest)" "$OUT_DIR/pytest.log" 100 \
  env GNORM_TEST_DEADLINE_S=75 GNORM_ALLOW_SKIPS=1 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark \
  -p gnorm_bench.device_pytest_deadline \
  -W default::DeprecationWarning -W default::PendingDeprecationWarning \
  -W default::FutureWarning "${TESTS[@]}"

# 2. Its table goes to the summary; the file it writes is left in the scratch folder.
step "accuracy table (benchmarks/accuracy.py)" "$SUMMARY" 45 \
  "$PY" benchmarks/accuracy.py --out "$WORK"

if [[ -n "$PLAN_PID" ]]; then
  say ""
  PLAN_RC=0
  wait "$PLAN_PID" || PLAN_RC=$?
  record_log "$PLAN_NAME" "$STEPS_LOG" "$WORK/plan.out" "${BG[*]}"
  record "$PLAN_NAME" 150 "$PLAN_RC" "$PLAN_T0"
else
  step "$PLAN_NAME" "$STEPS_LOG" 90 "${PLAN_CMD[@]}"
fi
# fold REPORT: a step's markdown report appended to steps.log.
fold() {
  if [[ -f "$1" ]]; then { echo "== $(basename "$1")"; cat "$1"; echo; } >>"$STEPS_LOG"; fi
}
fold "$WORK/plan/xla_gpu_plan.md"
if [[ -f "$WORK/plan/xla_gpu_plan.json" ]]; then cp "$WORK/plan/xla_gpu_plan.json" "$OUT_DIR/"; fi

# 4. The tile sweep: a fixed budget (what it covers: benchmarks/README.md), the limit 40 s
# more (imports, JAX's start on the GPU, the copy bandwidth, the reports). It writes its
# results after every item, so a kill at the limit keeps what it measured. Its candidate
# table comes back as one file, its report in steps.log, its decisions (its last lines) in
# the summary.
mkdir -p "$WORK/sweep"
step "Pallas tile sweep (benchmarks/pallas_sweep.py, budget $SWEEP_S s)" "$STEPS_LOG" \
  $((SWEEP_S + 40)) \
  "$PY" benchmarks/pallas_sweep.py ${SWEEP[@]+"${SWEEP[@]}"} --budget-s "$SWEEP_S" --out "$WORK/sweep"
fold "$WORK/sweep/pallas_sweep.md"
if [[ -f "$WORK/sweep/tuning_table.json" ]]; then cp "$WORK/sweep/tuning_table.json" "$OUT_DIR/"; fi

# 5. What the total leaves, after the drop-in benchmark (its limit, 60 s), the summary
# (5 s) and this process's imports and last report (10 s; its budget counts the rest),
# at most 150 s. The sweep's minute comes out of this budget (135-150 s before it, 55-100 s
# now): the benchmark measures its items most important first (gnorm against flax, plain
# cases, then SiLU), and its gnorm_pallas phase, which the sweep now covers, would start
# after 150 s anyway (4th of 7 phases; the first alone is 112 items).
BUDGET=$((TOTAL_S - (SECONDS - START) - 60 - 5 - 10))
if ((BUDGET > 150)); then BUDGET=150; fi
if ((BUDGET < 30)); then BUDGET=30; fi
step "device-time benchmark (benchmarks/gpu_bench.py, budget $BUDGET s)" "$STEPS_LOG" \
  $((BUDGET + 45)) \
  "$PY" benchmarks/gpu_bench.py ${BENCH[@]+"${BENCH[@]}"} --budget-s "$BUDGET" --no-progress --out "$OUT_DIR"
if [[ -f "$OUT_DIR/gpu_bench.md" ]]; then
  # On stdout: the plain cases' time tables.
  awk '/^## /{p = ($0 ~ /^## Forward(\+backward)? \(/)} p' "$OUT_DIR/gpu_bench.md"
fi

# 6.
step "drop-in model benchmark (benchmarks/drop_in.py)" "$STEPS_LOG" 60 \
  "$PY" benchmarks/drop_in.py "${DROP_IN[@]}" --no-progress --out "$WORK/drop_in"
if [[ -f "$WORK/drop_in/latest.json" ]]; then cp "$WORK/drop_in/latest.json" "$OUT_DIR/drop_in.json"; fi

# 7. Every target, met / NOT MET / n/a, from the benchmarks' json files.
step "targets of issues 19 and 20" "$SUMMARY" 30 \
  "$PY" benchmarks/gpu_bench.py --summarize "$OUT_DIR"

say ""
say "== step seconds:"
for t in "${TIMES[@]}"; do say "   $t"; done
NFILES=$(find "$OUT_DIR" -mindepth 1 | wc -l)
say "== total $((SECONDS - START)) s; $NFILES files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if ((NFILES > 8)); then say "== WARNING: more than 8 files in $OUT_DIR: the device machine returns 8"; fi
if ((${#FAILED[@]})); then
  say "== FAILED: ${FAILED[*]}"
  exit 1
fi
say "== all steps passed"
