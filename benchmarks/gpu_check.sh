#!/usr/bin/env bash
# One-shot GPU check of segclip's CUDA kernels, for a machine with a GPU and its own torch, python3,
# ninja and a CUDA toolkit, and no package registry (nothing is installed or downloaded):
#   1. builds the extension in place for sm_90 (SEGCLIP_WITH_CUDA=1, CUDA_HOME resolved here),
#   2. runs tests/test_cuda.py: the norm/scale/clip/value tests, then (2b, capped on its own, so that
#      neither part can starve the other) the per-group partials and adaptive clip tests,
#   3. runs segclip bench --device cuda (the clip suite; its JSON gives the last table),
#   4. runs benchmarks/gpu_sanitize.py under compute-sanitizer's memcheck,
#   5. runs the other tests (the trainer on the GPU among them), time-boxed,
#   6. racecheck and synccheck, if time is left;
# writes 8 files into $OUT (else ./gpu_results; the device tool brings back at most 8): env.txt,
# build.log, test_cuda.log, gpu_bench.json, gpu_bench.log, sanitize.log, test_others.log,
# gpu_check.json, and prints a short table last.
# Budget: GPU_CHECK_BUDGET_S (default 420 s, leaving room under a 10-minute command limit): every
# step runs under `timeout -k 10` with a cap cut from what is left, keeping time for the steps after
# it and the 10 s kill grace, so the whole script never overruns the budget; a step that cannot get
# at least 5 s is skipped ("not run"). Expected on an H200 (not yet measured): build < 1 min,
# test_cuda 1-2 min plus < 1 min for 2b, benchmark < 1 min, each sanitizer run < 1 min. compute-sanitizer instruments segclip's kernels
# only (--kernel-regex kns=segclip): torch's own kernels run at full speed and their hazards are
# not reported. The last table: per model, dtype and mode, segclip's and torch foreach's times, the
# ratio, segclip's GB/s and the norms' relative error against float64 (from gpu_bench.json).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; works in the repository root
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail  # not -e: a failing step is recorded and the next one still runs
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT_DIR="${OUT:-./gpu_results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
# The interpreter's own bin folder first (a venv's ninja, for the parallel build; torch looks it up on PATH).
PY_BIN="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)" && export PATH="$PY_BIN:$PATH"
T0=$(date +%s)

BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
BENCH_RESERVE_S=100  # kept for the benchmark (and memcheck) by the build and test_cuda
NEW_TESTS_RESERVE_S=60  # kept for step 2b (group partials, adaptive clip) by the build and step 2
NEW_TESTS_K="group or adaptive"  # pytest -k of step 2b: the tests of those two ops' CUDA kernels

log() { echo "[gpu_check $(($(date +%s) - T0))s] $*"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
KILL_GRACE_S=10  # timeout -k: SIGKILL this long after SIGTERM
cap() {  # cap MAX RESERVE: seconds a step may take: at most MAX, keeping RESERVE for later steps and
  # the kill grace; 0 (skip the step) when less than 5 s would be left, so no step overruns the budget
  local t=$(($(left) - $2 - KILL_GRACE_S))
  [ "$t" -gt "$1" ] && t=$1
  [ "$t" -lt 5 ] && t=0
  echo "$t"
}
run_capped() {  # run_capped SECONDS CMD...: CMD under timeout -k; rc 125 (not run) when SECONDS is 0
  local t=$1; shift
  if [ "$t" -le 0 ]; then log "no time left in the budget: $1 ... not run"; return 125; fi
  timeout -k "$KILL_GRACE_S" "$t" "$@"
}

# --- CUDA_HOME: the folder holding bin/nvcc and include/cuda_runtime.h (nvcc may be a wrapper script)
is_toolkit() { [ -n "${1:-}" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
resolve_cuda_home() {
  local cand nvcc real
  for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if is_toolkit "$cand"; then echo "$cand"; return 0; fi
  done
  if nvcc="$(command -v nvcc 2>/dev/null)"; then
    real="$(readlink -f "$nvcc")"
    cand="$(dirname "$(dirname "$real")")"
    if is_toolkit "$cand"; then echo "$cand"; return 0; fi
    # a wrapper such as: exec /usr/local/cuda-13.0/bin/nvcc "$@"
    for cand in $(grep -ao '/[^ "'\'']*/bin/nvcc' "$real" 2>/dev/null | sed 's#/bin/nvcc$##'); do
      if is_toolkit "$cand"; then echo "$cand"; return 0; fi
    done
  fi
  for cand in $(ls -d /usr/local/cuda* 2>/dev/null | sort -r); do
    if is_toolkit "$cand"; then echo "$cand"; return 0; fi
  done
  return 1
}

if CUDA_HOME="$(resolve_cuda_home)"; then
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
else
  log "no CUDA toolkit found (set CUDA_HOME); the build will fail"
  unset CUDA_HOME
fi

# --- environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "CUDA_HOME: ${CUDA_HOME:-none}"
  # each probe capped too (a hung driver call must not eat the budget)
  run_capped "$(cap 20 360)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>&1 | tail -2
  run_capped "$(cap 20 360)" nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv 2>&1 || true
  run_capped "$(cap 60 360)" "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  run_capped "$(cap 20 360)" "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
  run_capped "$(cap 30 360)" "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1
  echo "ninja: $(ninja --version 2>&1 || echo missing)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# --- 1. build (in place, sm_90 only)
log "building (SEGCLIP_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)"
mkdir -p segclip  # build_ext --inplace copies the libraries there (missing before the Python package lands)
B0=$(date +%s)
SEGCLIP_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  run_capped "$(cap 240 $((BENCH_RESERVE_S + NEW_TESTS_RESERVE_S + 60)))" "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$(($(date +%s) - B0))
grep -E "^  [A-Za-z_ ]+ += " "$OUT_DIR/build.log" || true
grep -iE "warning|error" "$OUT_DIR/build.log" | grep -v "Wunknown-pragmas\|pragma unroll" | tail -20 || true
log "build rc=$BUILD_RC in ${BUILD_S}s ($(ls segclip/_C*.so 2>/dev/null | xargs -n1 basename 2>/dev/null | tr '\n' ' '))"

# --- 2. tests/test_cuda.py
summary_of() {  # the last pytest summary line of a log, e.g. "40 passed, 2 skipped in 12.3s"
  grep -E "^=*.*( passed| failed| error| skipped| no tests ran).*=*$" "$1" 2>/dev/null | tail -1 | sed 's/=//g; s/^ *//; s/ *$//'
}
TEST_RC=125
NEW_RC=125
TEST_SUMMARY=""
NEW_SUMMARY=""
HAVE_PYTEST=0; "$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
if [ "$BUILD_RC" -eq 0 ] && [ "$HAVE_PYTEST" -eq 1 ]; then
  log "tests/test_cuda.py (all but: $NEW_TESTS_K)"
  run_capped "$(cap 200 $((BENCH_RESERVE_S + NEW_TESTS_RESERVE_S)))" "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda.py -k "not ($NEW_TESTS_K)" 2>&1 | tee "$OUT_DIR/test_cuda.log" | tail -25
  TEST_RC=${PIPESTATUS[0]}
  TEST_SUMMARY="$(summary_of "$OUT_DIR/test_cuda.log")"
  # 2b: the group partials and adaptive clip kernels, appended to the same log (8 files at most)
  log "tests/test_cuda.py -k '$NEW_TESTS_K'"
  NEW_LOG="$(mktemp)"
  run_capped "$(cap 90 $BENCH_RESERVE_S)" "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda.py -k "$NEW_TESTS_K" > "$NEW_LOG" 2>&1
  NEW_RC=$?
  NEW_SUMMARY="$(summary_of "$NEW_LOG")"
  tail -15 "$NEW_LOG"
  { echo; echo "===== step 2b: pytest tests/test_cuda.py -k '$NEW_TESTS_K' (rc $NEW_RC)"; cat "$NEW_LOG"; } >> "$OUT_DIR/test_cuda.log"
  rm -f "$NEW_LOG"
else
  log "tests skipped (build failed or pytest missing)"
fi

# --- 3. benchmark
BENCH_RC=125
if [ "$BUILD_RC" -eq 0 ]; then
  log "segclip bench --device cuda"
  run_capped "$(cap 240 40)" "$PY" -m segclip bench --device cuda --quick --dtypes fp32,bf16,fp16 --rounds 3 --no-progress --out "$OUT_DIR/gpu_bench.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
  BENCH_RC=${PIPESTATUS[0]}
fi

# --- 4. and 6. compute-sanitizer over every kernel path (benchmarks/gpu_sanitize.py), one log
SAN="$(command -v compute-sanitizer 2>/dev/null || true)"
if [ -z "$SAN" ] && [ -x "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" ]; then SAN="$CUDA_HOME/bin/compute-sanitizer"; fi
declare -A SAN_RC=([memcheck]=125 [racecheck]=125 [synccheck]=125)
sanitize() {  # sanitize TOOL MAX_SECONDS
  if [ "$BUILD_RC" -ne 0 ] || [ -z "$SAN" ]; then return 0; fi
  local t; t=$(cap "$2" 0)
  if [ "$t" -lt 20 ]; then log "compute-sanitizer $1: no time left"; return 0; fi
  log "compute-sanitizer --tool $1 (${t}s)"
  echo "===== compute-sanitizer --tool $1" >> "$OUT_DIR/sanitize.log"
  # No caching allocator: every tensor is its own allocation, so memcheck knows its exact bounds.
  # --kernel-regex kns=segclip: only kernels whose name holds "segclip" (ours: segclip::cuda::...)
  # are instrumented; torch's run unchecked (full speed, and their hazards are not ours to report).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_capped "$t" "$SAN" --tool "$1" --error-exitcode 99 \
    --kernel-regex kns=segclip --print-limit 20 "$PY" benchmarks/gpu_sanitize.py >> "$OUT_DIR/sanitize.log" 2>&1
  SAN_RC[$1]=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|all checks passed|failed$" "$OUT_DIR/sanitize.log" | tail -2
}
if [ -z "$SAN" ]; then log "compute-sanitizer not found: sanitizer runs skipped"; fi
sanitize memcheck 120

# --- 5. the other tests (CPU paths are CI's; here the GPU paths among them: trainer, fused_clip_)
OTHER_RC=125
OTHERS=$(ls tests/test_*.py 2>/dev/null | grep -v "tests/test_cuda.py" || true)
OTHER_T=$(cap 150 0)
if [ "$BUILD_RC" -eq 0 ] && [ "$HAVE_PYTEST" -eq 1 ] && [ -n "$OTHERS" ] && [ "$OTHER_T" -ge 30 ]; then
  log "other tests (time-boxed: ${OTHER_T}s)"
  # SEGCLIP_FOLD_UNTESTED_TORCH=1: tests/test_fold.py tests clip_optimizer_'s fold contract on this
  # image's torch (not in segclip.fold.TESTED_TORCH) instead of its warned fallback.
  # shellcheck disable=SC2086
  SEGCLIP_FOLD_UNTESTED_TORCH=1 run_capped "$OTHER_T" "$PY" -m pytest -q -p no:cacheprovider $OTHERS \
    > "$OUT_DIR/test_others.log" 2>&1
  OTHER_RC=$?
  tail -5 "$OUT_DIR/test_others.log"
fi

sanitize racecheck 90
sanitize synccheck 90

TOTAL_S=$(($(date +%s) - T0))
OTHER_SUMMARY="$(summary_of "$OUT_DIR/test_others.log")"
"$PY" - "$OUT_DIR" "$BUILD_RC" "$BUILD_S" "$TEST_RC" "$TEST_SUMMARY" "$OTHER_RC" "$OTHER_SUMMARY" "$BENCH_RC" \
  "${SAN_RC[memcheck]}" "${SAN_RC[racecheck]}" "${SAN_RC[synccheck]}" "$TOTAL_S" "$NEW_RC" "$NEW_SUMMARY" <<'EOF'
import json, sys
(out, build_rc, build_s, test_rc, test_sum, other_rc, other_sum, bench_rc, memcheck, racecheck, synccheck,
 total_s, new_rc, new_sum) = sys.argv[1:]
result = {"build": {"rc": int(build_rc), "seconds": int(build_s)},
          "test_cuda": {"rc": int(test_rc), "summary": test_sum},
          "test_cuda_group_adaptive": {"rc": int(new_rc), "summary": new_sum},
          "other_tests": {"rc": int(other_rc), "summary": other_sum},
          "bench": {"rc": int(bench_rc), "json": "gpu_bench.json"},
          "sanitizer": {"memcheck": int(memcheck), "racecheck": int(racecheck), "synccheck": int(synccheck),
                        "log": "sanitize.log"},
          "total_seconds": int(total_s)}
with open(f"{out}/gpu_check.json", "w") as f:
    json.dump(result, f, indent=2)
EOF

# --- the short table, last
status() { case "$1" in 0) echo ok ;; 125) echo "not run" ;; 124) echo "TIMEOUT" ;; *) echo "FAILED (rc $1)" ;; esac; }
echo
echo "================ segclip gpu_check (${TOTAL_S}s, results in $OUT_DIR) ================"
printf "%-20s %-16s %s\n" "build (sm_90)" "$(status "$BUILD_RC")" "${BUILD_S}s"
printf "%-20s %-16s %s\n" "test_cuda.py" "$(status "$TEST_RC")" "$TEST_SUMMARY"
printf "%-20s %-16s %s\n" "  group/adaptive" "$(status "$NEW_RC")" "$NEW_SUMMARY"
printf "%-20s %-16s %s\n" "bench (cuda)" "$(status "$BENCH_RC")" ""
for tool in memcheck racecheck synccheck; do
  printf "%-20s %-16s %s\n" "sanitizer $tool" "$(status "${SAN_RC[$tool]}")" ""
done
printf "%-20s %-16s %s\n" "other tests" "$(status "$OTHER_RC")" "$OTHER_SUMMARY"
if [ -s "$OUT_DIR/gpu_bench.json" ]; then  # per model, dtype and mode, from the benchmark's JSON
  "$PY" - "$OUT_DIR/gpu_bench.json" <<'EOF' || true
import json, sys
try:
    records = [r for r in json.load(open(sys.argv[1])).get("records", []) if r.get("device") == "cuda"]
except (OSError, ValueError) as exc:
    sys.exit(f"gpu_bench.json unreadable: {exc}")
by = {(r["case"], r.get("dtype"), r.get("mode"), r["impl"]): r for r in records}
def us(r):
    return None if not r or r.get("median_s") is None else 1e6 * r["median_s"]
def f(x, spec):
    return "-" if x is None else format(x, spec)
rows = [("case", "dtype", "mode", "segclip us", "torch us", "torch/segclip", "segclip GB/s", "% of bound",
         "norm err segclip", "norm err torch")]
for case, dtype, mode in sorted({k[:3] for k in by}):
    seg, tor, bound = (by.get((case, dtype, mode, k)) for k in ("segclip_cuda", "torch_foreach", "bound"))
    t_seg, t_tor, t_bound = us(seg), us(tor), us(bound)
    moved = (seg or tor or {}).get("extra", {}).get("bytes_moved")
    checked = {k: (by.get((case, dtype, "inactive", k)) or {}).get("extra", {}).get("norm_rel_err")
               for k in ("segclip_cuda", "torch_foreach")}  # against float64, on the random data
    rows.append((case, dtype, mode, f(t_seg, ".1f"), f(t_tor, ".1f"),
                 f(t_tor / t_seg if t_seg and t_tor else None, ".2f"),
                 f(moved / (t_seg * 1e-6) / 1e9 if moved and t_seg else None, ".0f"),
                 f(100 * t_bound / t_seg if t_bound and t_seg else None, ".0f"),
                 f(checked["segclip_cuda"], ".1e"), f(checked["torch_foreach"], ".1e")))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
if len(rows) == 1:
    print("(no CUDA records in gpu_bench.json)")
EOF
fi
[ "$BUILD_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$NEW_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] \
  && [ "${SAN_RC[memcheck]}" -eq 0 -o "${SAN_RC[memcheck]}" -eq 125 ]
