#!/usr/bin/env bash
# The GPU path end to end, with tiny budgets: train.py (both backbones, the gpu preset: bf16 autocast + torch.compile),
# sample.py, mbrl.py and its --bench, on the first CUDA GPU. One line per check, then the throughput lines.
#   bash scripts/gpu_smoke.sh            (writes only into a temporary folder, whose logs it keeps and names)
#   CHECK_TIMEOUT=300 bash scripts/gpu_smoke.sh   (each check's time limit in seconds; default 600)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=$(mktemp -d); echo "logs in $out"
fail=0
check() {                                     # check NAME COMMAND...: one line, with the time and the last output line
  local name=$1; shift; local t=$SECONDS
  if timeout "${CHECK_TIMEOUT:-600}" "$@" >"$out/$name.log" 2>&1; then echo "ok   $name ($((SECONDS - t)) s): $(tail -1 "$out/$name.log" | cut -c1-150)"
  else echo "FAIL $name ($((SECONDS - t)) s): $(tail -1 "$out/$name.log" | cut -c1-150)"; fail=1; fi
}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU visible"; exit 1; }
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| bf16', torch.cuda.is_bf16_supported())"
small="--n_free 256 --n_labelled 256 --eval_clips 16 --log_interval 10 --data_dir $out/data"
check train_dit  "$PY" train.py --backbone dit --preset gpu --max_iters 40 $small --out "$out/dit"
check train_ar   "$PY" train.py --backbone ar --preset gpu --max_iters 40 $small --out "$out/ar"
check sample_dit "$PY" sample.py --ckpt "$out/dit/ckpt.pt" --out "$out/dit.gif" --horizon 8
check sample_ar  "$PY" sample.py --ckpt "$out/ar/ckpt.pt" --out "$out/ar.gif" --horizon 4
check mbrl       "$PY" mbrl.py --env pusher --seed_episodes 16 --fit_iters 20 --rounds 1 --episodes 2 --update_iters 5 \
                   --value_iters 2 --eval_episodes 4 --out "$out/mbrl"
check mbrl_bench "$PY" mbrl.py --bench 10 --candidates 256 --horizon 8 --out "$out/bench"
for b in dit ar; do
  [ -f "$out/train_$b.log" ] && echo "$b: $(grep -E 'finetune step' "$out/train_$b.log" | tail -1 | cut -c1-200)"
done
exit $fail
