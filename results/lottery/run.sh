#!/usr/bin/env bash
# The lottery ticket experiment of results/lottery/, one run at a time (rerunning resumes every step).
# Budget per training: recipes/lottery_short.yaml (1 epoch over 2000 sentences, 125 steps of batch 16).
# Order: the lottery, its two controls, gradual magnitude pruning, then the seeds (dense, then the ticket).
set -u
cd "$(dirname "$0")/../.."
export PRUNE_TRAINER_CONLL_DIR=${PRUNE_TRAINER_CONLL_DIR:-../shared/data/conll2003} OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
OUT=results/lottery
LOTTERY=(lottery recipes/lottery_short.yaml --rounds 3 --rate 0.5 --rewind pretrained --results-dir $OUT --name imp)
run() { echo "== $(date -u +%FT%TZ) $*"; "$PY" -m prune_trainer "$@" || echo "== FAILED: $*"; }

run "${LOTTERY[@]}"                                                  # round 0 (dense) + 3 rounds: 50, 75, 87.5%
run "${LOTTERY[@]}" --control random-mask
run "${LOTTERY[@]}" --control random-reinit
for s in 0.5 0.75 0.875; do                                          # gradual magnitude pruning, same budget
  run run recipes/lottery_short.yaml --results-dir $OUT --name gmp_$s --set pruning.method=magnitude \
    --set pruning.schedule.final_sparsity=$s --set pruning.schedule.end_step=0.7 --set pruning.schedule.frequency=10
done
for seed in 43 44; do                                                # the dense fine-tune's spread over seeds
  run run recipes/lottery_short.yaml --results-dir $OUT --name dense_seed$seed --set training.seed=$seed
done
# The ticket retrained with seeds 43, 44 (same mask, same rewind point) at the sparsest round whose one-seed F1
# is within one std of the dense mean (round 1 when none is); TICKET_ROUND=r overrides.
TICKET_ROUND=${TICKET_ROUND:-$("$PY" - <<'PY'
from study.lottery_report import collect
data = collect("results/lottery")
ok = [row["round"] for row in data["imp"][1:] if data["dense"]["std"] is not None
      and row["eval_f1"] >= data["dense"]["mean"] - data["dense"]["std"]]
print(max(ok, default=1))
PY
)}
for seed in 43 44; do
  run run recipes/lottery_short.yaml --results-dir $OUT --name imp_round_${TICKET_ROUND}_seed$seed \
    --set training.seed=$seed --set pruning.method=fixed_mask \
    --set pruning.options.masks=$OUT/imp/masks/round_${TICKET_ROUND}.safetensors \
    --set pruning.options.weights=$OUT/imp/rewind.safetensors
done
"$PY" -m study lottery-report $OUT
