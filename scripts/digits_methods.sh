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
BASE_EPOCHS=${BASE_EPOCHS:-40}
EPOCHS=${EPOCHS:-15}
METHODS=${METHODS:-none linear lora loha lokr ia3 oft boft vera adapter prompt_deep full}
RESNET=${RESNET:-1}                         # 1: also the ResNet rows (resnet10t, random init)
RESNET_METHODS=${RESNET_METHODS:-none lora ia3 full}
N0=${N0:-100}
N=${N:-1000}
SKIP=${SKIP:-6}
MAX=${MAX:-60}
PS=${PEFTSMOOTH:-peftsmooth}

VIT=(dataset=digits model=vit_tiny model.input_size=16 model.kwargs.img_size=16 device=cpu)
RES=(dataset=digits model=resnet_tiny device=cpu)   # 8x8 digits upsampled to 32x32
FIT=(train.num_workers=0 train.batch_size=64 train.precision=bf16)

finished() { [[ -f "$1/run.json" ]] && grep -q '"finished": true' "$1/run.json"; }

run() {  # name, overrides...: train (skipped when finished), then certify (skipped when done)
  local name=$1; shift
  if ! finished "${OUT}/runs/${name}"; then
    echo "== train ${name}"
    "$PS" train "${FIT[@]}" "$@" "hydra.run.dir=${OUT}/runs/${name}"
  fi
  [[ -f "${OUT}/certify/${name}/summary.json" ]] && return 0
  echo "== certify ${name}"
  "$PS" certify "run=${OUT}/runs/${name}" "certify.n0=${N0}" "certify.n=${N}" "certify.skip=${SKIP}" \
    "certify.max=${MAX}" device=cpu "hydra.run.dir=${OUT}/certify/${name}"
}

base() {  # dir, model overrides...: the clean base (from random init, so train.lr=1e-3, not full's 1e-4)
  local dir=$1; shift
  finished "$dir" && return 0
  echo "== clean base ${dir} (full fine-tuning, sigma=0, ${BASE_EPOCHS} epochs)"
  "$PS" train "${FIT[@]}" "$@" peft=full sigma=0 "train.epochs=${BASE_EPOCHS}" train.lr=1e-3 "hydra.run.dir=${dir}"
}

base "${OUT}/base_vit" "${VIT[@]}"
for method in $METHODS; do
  run "vit_${method}" "${VIT[@]}" "base=${OUT}/base_vit" "peft=${method}" "sigma=${SIGMA}" "train.epochs=${EPOCHS}"
done
# full fine-tuning's default lr (1e-4) is the usual one for a pretrained ViT-B; this base was trained
# from scratch at 1e-3, so also show full at that rate
run vit_full_lr1e-3 "${VIT[@]}" "base=${OUT}/base_vit" peft=full "sigma=${SIGMA}" "train.epochs=${EPOCHS}" train.lr=1e-3

if [[ "$RESNET" == 1 ]]; then
  base "${OUT}/base_resnet" "${RES[@]}"
  for method in $RESNET_METHODS; do
    run "resnet_${method}" "${RES[@]}" "base=${OUT}/base_resnet" "peft=${method}" "sigma=${SIGMA}" \
      "train.epochs=${EPOCHS}"
  done
fi

"$PS" report "${OUT}/runs" "${OUT}/certify" "out=${OUT}"
