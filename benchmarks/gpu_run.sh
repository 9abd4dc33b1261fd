#!/bin/bash
# One device call: benchmarks.gpu_suite on the GPU machine, within a fixed wall time.
#
#   bash benchmarks/gpu_run.sh TAG FLAX TOTAL_S MARGIN_S SECTION...
#
# TAG names the outputs ($OUT/gpu_suite_TAG.json, $OUT/log_TAG.txt); FLAX is `image` (the
# GPU image's flax), `carried` (wheels in .whlflax/, e.g. this project's pin) or `auto`
# (a --smoke run of sd21_generate and sd3_step with the image's flax first, the carried one
# if that fails); the suite gets TOTAL_S minus the time spent so far as its timeout and
# that minus MARGIN_S as --budget-s (a section can overrun its share; on the timeout the
# suite still writes its JSON). Wants the diffusers wheel in .whl/ (the benchmarks guide,
# "GPU suite"; without it the peers are skipped); carry .whl (and .whlflax). As run on
# 2026-12-04: `bash benchmarks/gpu_run.sh a auto 420 45 sd21_generate methods_overhead`,
# then `b image 350 40 sd3_step spell_million` and `c image 320 30 methods_overhead`.
t0=$(date +%s); tag=$1; flax=$2; total=$3; margin=$4; shift 4
exec > >(tee -a "$OUT/log_$tag.txt") 2>&1
date -u; nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || echo "no diffusers wheel in .whl/: the suite runs without its peers"
# offline: anything that tries the hub fails at once instead of waiting on the network
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  HF_HUB_OFFLINE=1
errs() {  # "<number of sections not ok> [names]" of a suite JSON, 99 if unreadable
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); b=[n for n,e in r['sections'].items() if e['status']!='ok']; print(len(b), b)" "$1" 2>/dev/null || echo 99
}
use_carried() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/siteflax .whlflax/*.whl && export PYTHONPATH=/tmp/siteflax:$PYTHONPATH
}
smoke() {
  timeout 90 python3 -m benchmarks.gpu_suite --smoke --sections sd21_generate sd3_step \
    --out "$OUT/smoke_$1.json" >/dev/null 2>&1
  errs "$OUT/smoke_$1.json"
}
python3 -c "import jax, flax, torch, transformers, diffusers; print('image', jax.__version__, flax.__version__, torch.__version__, transformers.__version__, diffusers.__version__, jax.devices())"
if [ "$flax" = carried ]; then use_carried; fi
if [ "$flax" = auto ]; then
  s=$(date +%s); e=$(smoke image); echo "smoke with image flax: $e ($(( $(date +%s) - s )) s)"
  if [ "${e%% *}" != 0 ]; then
    use_carried; s=$(date +%s); e2=$(smoke carried)
    echo "smoke with carried flax: $e2 ($(( $(date +%s) - s )) s)"
    if [ "${e2%% *}" -gt "${e%% *}" ]; then export PYTHONPATH=/tmp/site:$PWD; echo "back to image flax"; fi
  fi
fi
python3 benchmarks/cudnn_grad_check.py
python3 -c "import flax; print('flax used', flax.__version__, flax.__file__)"
left=$(( total - $(date +%s) + t0 - 5 )); budget=$(( left - margin ))
echo "timeout $left budget $budget"
timeout $left python3 -m benchmarks.gpu_suite --budget-s $budget --sections "$@" \
  --out "$OUT/gpu_suite_$tag.json"
echo "rc $?"; date -u
