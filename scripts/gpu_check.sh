#!/usr/bin/env bash
# GPU verification of pagedopt's CUDA backend, for a GPU machine with torch and cuda-python
# already installed and no network. Runs, each under a time limit (the whole script stays
# under 10 minutes on one H200):
#   1. `pagedopt kernels` for this GPU's architecture (fills the kernel cache in parallel);
#   2. the GPU tests (`pytest -m cuda`: strict kernels bit-exact, fast kernels within their
#      tolerance tiers, managed-memory paging, telemetry, manager);
#   3. the GPU benchmark, benchmarks/gpu_bench.py (every 8-bit optimizer at 1B in both numerics
#      modes, gpt2-small, the host-time curve; about a minute);
# and prints a summary table last. Results go to $OUT (or ./gpu-check-out): kernels.log,
# pytest.log, junit.xml, bench.log, gpu_bench.json, summary.txt.
#
# Usage: scripts/gpu_check.sh            (PYTHON=... to pick the interpreter)
# If pytest is not installed, put its pure-Python wheels unpacked in .gpu-deps/ (added to
# PYTHONPATH here).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-deps ] && export PYTHONPATH="$PWD/.gpu-deps:$PYTHONPATH"
export PAGEDOPT_KERNEL_CACHE="${PAGEDOPT_KERNEL_CACHE:-$OUT_DIR/kernel-cache}"
started=$(date +%s)

stage() {  # stage NAME LIMIT_SECONDS LOG CMD... ; records "NAME rc seconds"
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  echo "$name $rc $(( $(date +%s) - t0 ))" >>"$OUT_DIR/stages.txt"
}
: >"$OUT_DIR/stages.txt"

"$PY" - <<'PYEOF' | tee "$OUT_DIR/environment.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
try:
    import cuda.bindings, cuda.bindings.nvrtc as n
    print("cuda-bindings", cuda.bindings.__version__, "nvrtc", n.nvrtcVersion()[1:])
except Exception as e:
    print("cuda-python unavailable:", e)
PYEOF
ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'sm_{p[0]}{p[1]}')" 2>/dev/null || echo none)

stage kernels 120 "$OUT_DIR/kernels.log" "$PY" -m pagedopt kernels --arch "$ARCH" --verbose
stage gpu-tests 270 "$OUT_DIR/pytest.log" "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_cuda_fast.py tests/test_paging_cuda.py \
  tests/test_manager.py tests/test_telemetry_exporter.py -q -rs \
  -p no:cacheprovider --junitxml="$OUT_DIR/junit.xml"
stage benchmark 180 "$OUT_DIR/bench.log" "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR/gpu_bench.json"

"$PY" - "$OUT_DIR" "$started" <<'PYEOF' | tee "$OUT_DIR/summary.txt"
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, started = Path(sys.argv[1]), int(sys.argv[2])
print("\n==== pagedopt gpu_check summary ====")
print(f"{'stage':12} {'result':8} {'seconds':>7}  detail")
for line in (out / "stages.txt").read_text().split("\n"):
    if not line.strip():
        continue
    name, rc, secs = line.split()
    result = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"FAIL({rc})")
    detail = ""
    if name == "kernels":
        lines = [l for l in (out / "kernels.log").read_text().splitlines() if l.startswith("compiled ")]
        detail = lines[-1][:90] if lines else ""
    if name == "gpu-tests" and (out / "junit.xml").exists():
        s = ET.parse(out / "junit.xml").getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        detail = f"{s.get('tests')} tests, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} skipped"
    print(f"{name:12} {result:8} {secs:>7}  {detail}")
bench = out / "gpu_bench.json"
if bench.exists():
    sys.path.insert(0, "benchmarks")
    from gpu_bench_report import format_table, report_from_json

    print()
    print(format_table(report_from_json(bench.read_text())))
print(f"total {int(time.time()) - started} s")
PYEOF
awk '$2 != 0 { bad = 1 } END { exit bad }' "$OUT_DIR/stages.txt"
