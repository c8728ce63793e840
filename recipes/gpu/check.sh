#!/usr/bin/env bash
# The GPU check (about 10 minutes on one H200), run on the lent machine from the repository root
# after recipes/gpu/prepare.sh ran here:
#   run(command="bash recipes/gpu/check.sh", carry=[".whl", "runs/gpu-check"], timeout_s=600)
# Writes $OUT/gpu-env.json, gpu-tests.log, gpu-train.json, gpu-evaluate.json, gpu-bench.json
# (and the same under bench/ in the tree). CHECK_DEVICE=cpu CHECK_QUICK=1 runs the same steps on a
# CPU, small, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench}
mkdir -p "$OUT" bench
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python3 -c "import jiwer, datasets, soundfile, jsonargparse" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
DEVICE=${CHECK_DEVICE:-cuda}
(nvidia-smi || true) > "$OUT/gpu-smi.txt" 2>&1
# 1. the CUDA-marked tests (GPU == CPU decoding and loss, half precision)
if [ "$DEVICE" = cuda ]; then
    timeout 240 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
    echo "cuda tests: exit $?" | tee -a "$OUT/gpu-tests.log"
fi
# 2-4. training steps, evaluate throughput, bench
python3 recipes/gpu/check.py run --kit runs/gpu-check --out "$OUT" --device "$DEVICE" ${CHECK_QUICK:+--quick}
status=$?
cp "$OUT"/gpu-*.json bench/ 2>/dev/null || true
exit $status
