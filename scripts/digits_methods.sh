#!/usr/bin/env bash
# Every method at its default settings on the embedded digits data (CPU, no download): one clean base
# per model (full fine-tuning at sigma = 0), then each `peft=` method from it at sigma = 0.25 with
# nothing but the epochs set (each method's learning rate is its conf/peft/<method>.yaml default),
# all certified the same way, then one `peftsmooth report` table.
#
#   bash scripts/digits_methods.sh                     # outputs/digits_methods/report.{md,csv,png}
#   OUT=/tmp/m METHODS="none lora full" RESNET=0 bash scripts/digits_methods.sh
#
# Every step skips what is already done (a run whose run.json says finished, a certify dir with
# summary.json), so rerunning after a kill resumes.
set -euo pipefail

OUT=${OUT:-outputs/digits_methods}
SIGMA=${SIGMA:-0.25}
EPOCHS=${EPOCHS:-15}
METHODS=${METHODS:-none linear lora loha lokr ia3 oft boft vera adapter prompt_deep full}
RESNET=${RESNET:-1}                         # 1: also the ResNet rows (resnet10t, random init)
RESNET_METHODS=${RESNET_METHODS:-none lora ia3 full}
. "$(dirname "$0")/digits_common.sh"        # VIT, FIT, finished, certify, clean_base; N0, N, SKIP, MAX
RES=(dataset=digits model=resnet_tiny device=cpu)   # 8x8 digits upsampled to 32x32

run() {  # name, overrides...: train (skipped when finished), then certify
  local name=$1; shift
  if ! finished "${OUT}/runs/${name}"; then
    echo "== train ${name}"
    "$PS" train "${FIT[@]}" "$@" "hydra.run.dir=${OUT}/runs/${name}"
  fi
  certify "$name"
}

clean_base "${OUT}/base_vit" "${VIT[@]}"
for method in $METHODS; do
  run "vit_${method}" "${VIT[@]}" "base=${OUT}/base_vit" "peft=${method}" "sigma=${SIGMA}" "train.epochs=${EPOCHS}"
done
# full fine-tuning's default lr (1e-4) is the usual one for a pretrained ViT-B; this base was trained
# from scratch at 1e-3, so also show full at that rate
run vit_full_lr1e-3 "${VIT[@]}" "base=${OUT}/base_vit" peft=full "sigma=${SIGMA}" "train.epochs=${EPOCHS}" train.lr=1e-3

if [[ "$RESNET" == 1 ]]; then
  clean_base "${OUT}/base_resnet" "${RES[@]}"
  for method in $RESNET_METHODS; do
    run "resnet_${method}" "${RES[@]}" "base=${OUT}/base_resnet" "peft=${method}" "sigma=${SIGMA}" \
      "train.epochs=${EPOCHS}"
  done
fi

"$PS" report "${OUT}/runs" "${OUT}/certify" "out=${OUT}"
