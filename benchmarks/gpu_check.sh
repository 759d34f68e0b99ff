#!/usr/bin/env bash
# gnorm on one CUDA GPU, in one go: the accuracy tests, the accuracy table and
# the SD-UNet benchmark (issue 11). Under 6 minutes on an H100.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else gpu_check_out/
#
# Runs gnorm from this source tree (PYTHONPATH = the repository root, nothing
# installed) with the JAX (CUDA build), flax, equinox, torch, pytest and
# hypothesis the machine has; dm-haiku is optional (the benchmark skips it).
# Writes 7 files, all directly in OUT_DIR:
#   summary.txt   versions, devices, nvidia-smi, each step's status and time,
#                 accuracy.py's output
#   pytest.log    the accuracy tests, run on the GPU
#   accuracy.md   benchmarks/accuracy.py's table
#   bench.log     the benchmark's own log
#   latest.md, latest.json, latest.png   the benchmark (--cases sd-unet): gnorm
#                 (XLA and Pallas), flax, torch, ...; issues #5, #7 and #13's targets
# Exits non-zero at once if JAX sees no GPU, and at the end if any step failed
# (a failing step does not stop the later ones: one GPU session gets them all;
# each step is stopped after 4 minutes at most, the accuracy table after 90 s).
#
# GNORM_GPU_CHECK_DRY_RUN=1 runs every step on the CPU with tiny settings
# (tests/test_benchmark.py does, so that the script cannot rot).
# GNORM_GPU_CHECK_ROUNDS: benchmark rounds (default 10); GNORM_GPU_CHECK_TESTS:
# pytest's arguments instead of the two test files; PYTHON: the interpreter.
set -euo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
DRY="${GNORM_GPU_CHECK_DRY_RUN:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Reproducible property tests (tests/conftest.py loads hypothesis' "ci" profile).
export CI="${CI:-1}"
cd "$ROOT"

# tests/conftest.py defaults JAX_PLATFORMS to cpu: name the platform explicitly.
if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  # Enough to prove each step's plumbing; the suite itself runs the rest.
  TESTS=(tests/test_group_norm.py -k "float32_matches_reference_on_standard_normal and 12")
  BENCH=(--quick --cases quick --rounds 1 --sections fused --only gnorm)
else
  export JAX_PLATFORMS=cuda
  # The numerical tests; test_memory.py and the others check CPU-compiled
  # programs, subprocesses on simulated CPU devices, or the API, not the maths.
  TESTS=(tests/test_group_norm.py tests/test_features.py tests/test_padding.py tests/test_pallas.py)
  # The default --only: every implementation, gnorm's Pallas kernels included
  # (timed where JAX's backend is the GPU) beside gnorm's XLA path, flax and torch.
  BENCH=(--cases sd-unet --rounds "${GNORM_GPU_CHECK_ROUNDS:-10}" --sample-ms 10 --compile-reps 1)
fi
if [[ -n "${GNORM_GPU_CHECK_TESTS:-}" ]]; then read -r -a TESTS <<<"$GNORM_GPU_CHECK_TESTS"; fi

SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
START=$SECONDS
FAILED=()

say "# gnorm GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), dry run: $DRY"
say "repository: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git')), out: $OUT_DIR"
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
             "dm-haiku", "torch", "numpy", "ml_dtypes", "pytest", "hypothesis", "matplotlib"):
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
try:
  import torch
except Exception as e:  # noqa: BLE001 - torch is optional
  print("torch not importable:", e)
else:
  cuda = torch.cuda.is_available()
  print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
        torch.cuda.get_device_name() if cuda else "")
EOF
then
  say "== FAILED: JAX sees no GPU (GNORM_GPU_CHECK_DRY_RUN=1 runs this on the CPU)"
  exit 1
fi

# step NAME LOG LIMIT_S COMMAND...: runs COMMAND, killed after LIMIT_S seconds
# (a hang must not eat the GPU session: the later steps still run), with its
# output in LOG (the summary, or a log of its own whose last lines the summary
# gets); records its status and time, and goes on.
step() {
  local name=$1 log=$2 limit=$3 t0=$SECONDS rc=0
  shift 3
  if command -v timeout >/dev/null; then set -- timeout --kill-after=10 "$limit" "$@"; fi
  say ""
  say "== $name: $(printf '%q ' "$@")"
  if [[ "$log" == "$SUMMARY" ]]; then
    "$@" 2>&1 | tee -a "$SUMMARY" || rc=$?
  else
    "$@" >"$log" 2>&1 || rc=$?
    tail -n 12 "$log" | tee -a "$SUMMARY"
  fi
  local status=ok
  if [[ $rc == 124 || $rc == 137 ]]; then
    status="FAILED (no result after $limit s)"
  elif [[ $rc != 0 ]]; then
    status="FAILED (exit $rc)"
  fi
  say "== $name: $status in $((SECONDS - t0)) s"
  if [[ $rc != 0 ]]; then FAILED+=("$name"); fi
}

# A newer JAX may deprecate what the suite uses: shown in the log, not fatal
# here (pyproject.toml turns every warning into an error).
step "accuracy tests (pytest)" "$OUT_DIR/pytest.log" 240 \
  "$PY" -m pytest -q -p no:cacheprovider \
  -W default::DeprecationWarning -W default::PendingDeprecationWarning \
  -W default::FutureWarning "${TESTS[@]}"

step "accuracy table (benchmarks/accuracy.py)" "$SUMMARY" 90 \
  "$PY" benchmarks/accuracy.py --out "$OUT_DIR"

step "benchmark (benchmarks/bench.py)" "$OUT_DIR/bench.log" 240 \
  "$PY" benchmarks/bench.py "${BENCH[@]}" --no-progress --out "$OUT_DIR"
if [[ -f "$OUT_DIR/latest.md" ]]; then
  # On stdout: the header, the time and bandwidth tables and the targets
  # (issue #5's and #13's, then the fused section's).
  awk '/^##+ /{p = ($0 ~ /^##+ (Forward|Bandwidth|Issue|Fused targets)/)}
       !/^## /&&!seen{print} /^## /{seen=1} p' \
    "$OUT_DIR/latest.md"
fi

say ""
say "== total $((SECONDS - START)) s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if ((${#FAILED[@]})); then
  say "== FAILED: ${FAILED[*]}"
  exit 1
fi
say "== all steps passed"
