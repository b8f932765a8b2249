#!/usr/bin/env bash
# Issue 6 GPU benchmark in one call on one card. From the repo root on the GPU host:
#
#   bash bench/gpu_issue6.sh OUTDIR          # e.g. the device tool's $OUT, with carry [".peers"]
#
# .peers/ (git-ignored) holds the peer wheels: bash ../shared/bench/get_peer_wheels.sh .peers (~28 MB).
# Parts run most valuable first; each has a soft budget (the driver skips rows that no longer fit and
# records them as "skipped: time budget"; every JSON is rewritten after each row) and a hard `timeout`
# 30 s above it. Expected on an H200 (cold machine):
#   setup  pip install of the wheels into /tmp/site (SITE=)                         ~15 s
#   1b     gpu_peers llama-1b bs 8, 16- and 4-bit   budget B1=180 s: make folder ~15 s, matmul ceiling
#          ~5 s, then ~20-35 s per row (Unsloth's import alone ~20 s); the last rows may be skipped
#   8b     gpu_peers llama-8b bs 4, 16- and 4-bit   budget B8=210 s: make + save 16 GB bf16 to /tmp
#          ~40 s, then ~40-60 s per row (load 16 GB, Triton JIT, 11 steps)
#   long   long_context 8B nf4, 32k/64k/128k (then +64k while the budget allows)   budget BL=120 s:
#          load + quantize ~30 s, steps ~5 / 15 / 45 s; stops early when the next step would not fit
#   total  ~8.5-9 min.
# A second call for what a budget skipped: PARTS="8b" B8=500 bash bench/gpu_issue6.sh OUTDIR
# (each call may land on a fresh machine: the script reinstalls the wheels and remakes /tmp folders).
set -uo pipefail
OUTDIR=${1:?usage: bash bench/gpu_issue6.sh OUTDIR}
PARTS=${PARTS:-"1b 8b long"}   # also: gputests (pytest -m gpu), parity (bench/loss_parity.py), e2e (bench/train_e2e.py), kernels (bench/kernels_vs_liger.py),
# pcie (bench/pcie_bandwidth.py), t1b (the 1B targets, 2 rounds: B1=420 fits one call), t8b (8B targets)
# Each result lands in OUTDIR under its stable name (gpu_peers_llama-1b_16bit.json, kernels_vs_liger.json, ...:
# bench/gpu_peers.py's result_name); copy it over bench/results/ to replace the one it supersedes.
# Extra gpu_peers arguments per shape (the environment cannot carry bash arrays): one string each,
# split on '|', e.g. ARGS1='--only|deftune fast,unsloth|--variants|mlp8:train.offload_mlp_layers=8|--tag|variants'
IFS='|' read -r -a ARGS1 <<< "${ARGS1:-}"
IFS='|' read -r -a ARGS8 <<< "${ARGS8:-}"
B1=${B1:-180}; B8=${B8:-210}; BL=${BL:-120}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUTDIR"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUTDIR/gpu_issue6.log"; }

say "python: $($PY --version 2>&1); host: $(hostname); parts: $PARTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUTDIR/gpu_issue6.log"
if compgen -G ".peers/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .peers/*.whl \
    >> "$OUTDIR/gpu_issue6.log" 2>&1 || say "WARNING: peer wheel install failed (see log); peers will report errors"
else
  say "WARNING: no .peers/*.whl (carry .peers); Unsloth/Liger/bitsandbytes rows will report 'not installed'"
fi
export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
say "setup done"

for part in $PARTS; do
  case $part in
    gputests)
      say "pytest -m gpu"
      # GPU_TESTS_K: a pytest -k expression to run only some (e.g. "nf4").
      timeout -k 5 240 $PY -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests 2>&1 \
        | tail -25 | tee "$OUTDIR/pytest_gpu.log"; rc=${PIPESTATUS[0]}
      ;;
    parity)
      say "loss_parity llama-1b (50 steps, deftune fast vs HF+PEFT)"
      timeout -k 5 240 $PY bench/loss_parity.py --shape llama-1b --out "$OUTDIR/loss_parity.json" 2>&1 | tail -15 | tee "$OUTDIR/loss_parity.log"; rc=${PIPESTATUS[0]}
      ;;
    kernels)
      say "kernels_vs_liger (per-op race: deftune Triton vs Liger vs PyTorch)"
      timeout -k 5 240 $PY bench/kernels_vs_liger.py --out "$OUTDIR/kernels_vs_liger.json" 2>&1 | tail -30 | tee "$OUTDIR/kernels_vs_liger.log"; rc=${PIPESTATUS[0]}
      ;;
    pcie)
      timeout -k 5 60 $PY bench/pcie_bandwidth.py --out "$OUTDIR/pcie_bandwidth.json" 2>&1 | tee -a "$OUTDIR/gpu_issue6.log"; rc=${PIPESTATUS[0]}
      ;;
    1b)
      say "gpu_peers llama-1b bs 8 (budget ${B1}s)"
      timeout -k 5 $((B1 + 30)) $PY bench/gpu_peers.py --shape llama-1b --bs 8 --seq 2048 --precisions 16,4 \
        --budget-s "$B1" --out-dir "$OUTDIR" "${ARGS1[@]}" 2>&1 | tee "$OUTDIR/gpu_peers_llama-1b.log"; rc=${PIPESTATUS[0]}
      ;;
    8b)
      say "gpu_peers llama-8b bs 4 (budget ${B8}s)"
      timeout -k 5 $((B8 + 30)) $PY bench/gpu_peers.py --shape llama-8b --bs 4 --seq 2048 --precisions 16,4 \
        --budget-s "$B8" --out-dir "$OUTDIR" "${ARGS8[@]}" 2>&1 | tee "$OUTDIR/gpu_peers_llama-8b.log"; rc=${PIPESTATUS[0]}
      ;;
    long)
      say "long_context llama-8b nf4 (budget ${BL}s)"
      timeout -k 5 $((BL + 30)) $PY bench/long_context.py --model-dir /tmp/deftune_bench_llama-8b --shape llama-8b \
        --lengths 32768,65536,131072 --cap-gb 80 --mlp-tile "${MLP_TILE:-8192}" --extend-step 65536 --max-len 524288 --budget-s "$BL" \
        --out "$OUTDIR/long_context.json" 2>&1 | tee "$OUTDIR/long_context.log"; rc=${PIPESTATUS[0]}
      ;;
    t1b)
      # The 1B targets, 2 rounds (bench/gpu_peers.py --rounds): the recipe that fits under Unsloth's peak.
      say "gpu_peers llama-1b targets, 2 rounds (budget ${B1}s)"
      timeout -k 5 $((B1 + 30)) $PY bench/gpu_peers.py --shape llama-1b --bs 8 --seq 2048 --precisions 16,4 \
        --budget-s "$B1" --rounds 2 --set train.checkpoint_skip=2 --set4 train.reuse_dequantized=true \
        --only "deftune fast,unsloth,deftune fast nf4,unsloth 4bit" --out-dir "$OUTDIR" \
        "${ARGS1[@]}" 2>&1 | tee "$OUTDIR/gpu_peers_llama-1b.log"; rc=${PIPESTATUS[0]}
      ;;
    t8b)
      # The 8B targets (one round: two would not fit one call) + reuse_dequantized's 4-bit row beside them.
      say "gpu_peers llama-8b targets (budget ${B8}s)"
      timeout -k 5 $((B8 + 30)) $PY bench/gpu_peers.py --shape llama-8b --bs 4 --seq 2048 --precisions 16,4 \
        --budget-s "$B8" --set train.offload_mlp_layers=16 \
        --variants "rd:train.offload_mlp_layers=16,train.reuse_dequantized=true" \
        --only "deftune fast,unsloth,deftune fast nf4,unsloth 4bit,deftune fast nf4 rd" \
        --out-dir "$OUTDIR" "${ARGS8[@]}" 2>&1 | tee "$OUTDIR/gpu_peers_llama-8b.log"; rc=${PIPESTATUS[0]}
      ;;
    e2e)
      # The user path (bench/train_e2e.py): `deftune train` with its defaults (+ E2E_VARIANTS) against Unsloth's
      # documented TRL SFTTrainer path, Unsloth's bare step and HF + PEFT. E2E_SHAPE/E2E_BS/E2E_P/E2E_ROUNDS.
      say "train_e2e ${E2E_SHAPE:-llama-1b} (budget ${BE:-480}s)"
      timeout -k 5 $((${BE:-480} + 40)) $PY bench/train_e2e.py --shape "${E2E_SHAPE:-llama-1b}" --bs "${E2E_BS:-8}" \
        --seq 2048 --precisions "${E2E_P:-16,4}" --rounds "${E2E_ROUNDS:-1}" --budget "${BE:-480}" --timeout 240 \
        ${E2E_VARIANTS:+--variants "$E2E_VARIANTS"} --out "$OUTDIR/train_e2e_${E2E_SHAPE:-llama-1b}.json" 2>&1 \
        | tail -40 | tee "$OUTDIR/train_e2e.log"; rc=${PIPESTATUS[0]}
      ;;
    *) say "unknown part $part (known: gputests parity kernels pcie 1b t1b 8b t8b long e2e)"; rc=2 ;;
  esac
  say "$part finished (exit $rc; 124 = hard timeout, the JSON keeps the rows done before it)"
done
# Model folders stay in /tmp for a later call on the same warm machine; nothing large goes to OUTDIR.
# The per-row logs and profiles go back as one archive (the device tool returns only a few files per call).
logdirs=$(cd "$OUTDIR" && ls -d *_logs 2>/dev/null)
if [ -n "$logdirs" ]; then
  (cd "$OUTDIR" && tar czf logs.tgz $logdirs && rm -rf $logdirs) && say "row logs and profiles: logs.tgz"
fi
say "all done"
