#!/usr/bin/env bash
# The GPU check: the cuda-marked tests (every fast form held equal to its reference, and every
# registered layer compiled whole against eager, on CUDA), every bench suite with --device cuda, and
# COMPILE_SUITES again with --compile, summarised in one JSON file.
#
#   scripts/device-check.sh [OUT_DIR]        (default: $DEVICE_CHECK_DIR, else ./device-check)
#
# Run from the repository root on a machine whose python3 already has torch (CUDA build), pytest,
# hypothesis, numpy, safetensors, PyYAML, tqdm and matplotlib: nothing is installed, the checkout is
# put first on PYTHONPATH. Each step runs under its own time limit (seconds; override with
# PYTEST_TIMEOUT, BENCH_TIMEOUT); a step that fails or runs out of time is recorded and the next one
# runs. BENCH_FLAGS (e.g. "--quick") is passed to every bench. Writes OUT_DIR/device-check.json
# (scripts/device_check_summary.py) and exits non-zero when a test failed or a step failed.
# ROUTEMEM_GIT_COMMIT names the commit of a copied checkout (its .git may be missing or stale).
set -u

OUT_DIR="${1:-${DEVICE_CHECK_DIR:-device-check}}"
PYTEST_TIMEOUT="${PYTEST_TIMEOUT:-300}"  # the compile tests generate Triton kernels
BENCH_TIMEOUT="${BENCH_TIMEOUT:-90}"
BENCH_FLAGS="${BENCH_FLAGS:-}"
PY="${PYTHON:-python3}"

mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2  # absolute: we cd below
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# every suite routemem ships (override with SUITES="a b")
SUITES="${SUITES:-$("$PY" -c 'from routemem.bench import SUITES; print(" ".join(SUITES))')}"
COMPILE_SUITES="${COMPILE_SUITES-apn fast-slow}"  # run again with --compile ("" for none)
rm -f "$OUT_DIR"/steps.tsv "$OUT_DIR"/pytest-cuda.xml "$OUT_DIR"/bench-*.json "$OUT_DIR"/device-check.json

# step NAME LIMIT LOG COMMAND...: run COMMAND under `timeout LIMIT`, output to LOG, and append
# "NAME<TAB>exit status<TAB>seconds<TAB>LIMIT" to steps.tsv.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local start end rc
    start=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.3f", b-a}')" \
        "$limit" >>"$OUT_DIR/steps.tsv"
    echo "[device-check] $name: exit $rc ($(tail -n 1 "$log" 2>/dev/null | cut -c1-160))"
}

# (a bash -c string: timeout runs programs, not shell functions)
step environment 30 "$OUT_DIR/environment.log" bash -c '
    nvidia-smi -L > "$1/nvidia-smi.txt" 2>&1; smi=$?
    cat "$1/nvidia-smi.txt"
    "$2" -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU\",
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" && exit $smi' _ "$OUT_DIR" "$PY"
cat "$OUT_DIR/environment.log"

# fla's kernels (mode="fla", its cuda-marked tests, the kernels suite's fla rows) from a folder of
# wheels, for a machine without network: FLA_WHEELS=path/to/wheels (an ignored folder of the checkout)
# holding fla-core and einops (fla-core is the kernels alone; flash-linear-attention adds its
# transformers models, which routemem does not need). Without it, those tests and rows say fla is absent.
if [ -n "${FLA_WHEELS:-}" ]; then
    step install-fla 120 "$OUT_DIR/install-fla.log" \
        "$PY" -m pip install --no-index --no-deps --find-links "$FLA_WHEELS" fla-core einops
fi

step pytest "$PYTEST_TIMEOUT" "$OUT_DIR/pytest-cuda.log" \
    "$PY" -m pytest -q -m cuda -p no:cacheprovider -rfEs --junitxml="$OUT_DIR/pytest-cuda.xml" tests

for suite in $SUITES; do
    # shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
    step "bench-$suite" "$BENCH_TIMEOUT" "$OUT_DIR/bench-$suite.log" \
        "$PY" -m routemem bench "$suite" --device cuda --out "$OUT_DIR/bench-$suite.json" $BENCH_FLAGS
done

# The same suites with every timed form under torch.compile (Inductor's Triton kernels), --quick
# to bound the compile time; reported as the pseudo-suites "<suite>-compiled". (bench train times
# compiled against eager training steps in its own rows, above.)
COMPILED=""
for suite in $COMPILE_SUITES; do
    step "bench-$suite-compiled" "$BENCH_TIMEOUT" "$OUT_DIR/bench-$suite-compiled.log" \
        "$PY" -m routemem bench "$suite" --device cuda --compile --quick --out "$OUT_DIR/bench-$suite-compiled.json"
    COMPILED="$COMPILED $suite-compiled"
done

# shellcheck disable=SC2086  # lists of suite names
"$PY" scripts/device_check_summary.py "$OUT_DIR" --suites $SUITES $COMPILED
status=$?
echo "[device-check] summary: $OUT_DIR/device-check.json"
exit "$status"
