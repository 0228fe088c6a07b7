#!/usr/bin/env bash
# Training objectives and schedules side by side on the embedded digits data (CPU, no download):
# LoRA and full fine-tuning with train.loss = ce / consistency / macer / smoothadv, and LoRA with the
# LP-FT schedule, all from one clean base, with the same epochs, certified the same way, then one
# `peftsmooth report` table (ACR, certified accuracy at 0.25 / 0.5, ...).
#
#   bash scripts/digits_objectives.sh                          # outputs/digits_objectives/report.{md,csv,png}
#   BASE=outputs/train/base EPOCHS=3 MACER_K=4 SMOOTHADV_M=2 bash scripts/digits_objectives.sh
#
# Every step skips what is already done (a run whose run.json says finished, a certify dir with
# summary.json), so rerunning after a kill resumes. BASE: a `peft=full sigma=0` run on digits; made
# here when absent (BASE_EPOCHS epochs). Learning rates are each method's default (conf/peft/*.yaml).
set -euo pipefail

OUT=${OUT:-outputs/digits_objectives}
BASE=${BASE:-${OUT}/base}
SIGMA=${SIGMA:-0.25}
EPOCHS=${EPOCHS:-15}
MACER_K=${MACER_K:-16}          # the paper's k (noise samples per image); cost grows ~k-fold
SMOOTHADV_M=${SMOOTHADV_M:-8}   # the paper's m_train; cost grows ~m * (num_steps + 1)-fold
SMOOTHADV_EPS=${SMOOTHADV_EPS:-0.25}  # native-pixel L2 budget: the default 1.0 collapses 8x8 digits
LP_EPOCHS=${LP_EPOCHS:-2}
. "$(dirname "$0")/digits_common.sh"   # VIT, FIT, finished, certify, clean_base; N0, N, SKIP, MAX

clean_base "$BASE" "${VIT[@]}"

train() {  # name, extra overrides...: train (skipped when finished), then certify
  local name=$1; shift
  if ! finished "${OUT}/runs/${name}"; then
    echo "== train ${name}"
    "$PS" train "${VIT[@]}" "${FIT[@]}" "base=${BASE}" "sigma=${SIGMA}" "train.epochs=${EPOCHS}" \
      "train.macer.k=${MACER_K}" "train.smoothadv.m=${SMOOTHADV_M}" "train.smoothadv.epsilon=${SMOOTHADV_EPS}" \
      "$@" "hydra.run.dir=${OUT}/runs/${name}"
  fi
  certify "$name"
}

# cheapest first: ce, consistency and LP-FT, then the k- / m-fold costlier MACER and SmoothAdv
for method in lora full; do
  for loss in ce consistency; do
    train "${method}_${loss}" "peft=${method}" "train.loss=${loss}"
  done
done
train lora_ce_lpft peft=lora train.loss=ce train.schedule=lp_ft "train.lp_epochs=${LP_EPOCHS}"
for loss in macer smoothadv; do
  for method in lora full; do
    train "${method}_${loss}" "peft=${method}" "train.loss=${loss}"
  done
done

"$PS" report "${OUT}/runs" "${OUT}/certify" "out=${OUT}"
