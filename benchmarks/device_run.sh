#!/usr/bin/env bash
# For a lent GPU machine (no network): one call runs benchmarks/gpu_check.py under a budget.
# Prepare here first: `pip download -d .whl` the packages the machine lacks (its own torch is
# kept), and a cut of the Fashion-MNIST IDX files in .gpu/fashion-mnist (both git-ignored,
# carried to the machine); then run `bash benchmarks/device_run.sh` there, with $OUT set.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PY=${PY:-$(python3 -c 'import sys; print(sys.executable)')}
BUDGET=${BUDGET:-480}
echo "python: $PY"; nvidia-smi -L 2>&1 | head -3
if [ -z "${NO_WHEELS:-}" ]; then
  timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1; echo "wheels: rc $?"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
timeout $((BUDGET + 40)) "$PY" benchmarks/gpu_check.py --out "$OUT/gpu" --budget "$BUDGET" \
  --data-root "$PWD/.gpu/fashion-mnist" ${SKIP:+--skip $SKIP}
echo "gpu_check: rc $?"
cat "$OUT/gpu/gpu_check.md" 2>/dev/null | head -40
