#!/usr/bin/env bash
# The CIFAR-10 comparison of scripts/cifar10_vit_comparison.sh at laptop scale, on the embedded digits
# data (no download, CPU): clean base -> LoRA PEFTSmoothing at each sigma -> denoised-smoothing
# baselines (DnCNN, MSE and stability objectives) on the same base -> certify every run, and the base
# without adaptation at every sigma -> `peftsmooth report`.
#
#   bash scripts/digits_small.sh                       # outputs/digits_small/report.{md,csv,png}
#   OUT=/tmp/d SIGMAS=0.25,0.5 N=500 bash scripts/digits_small.sh
#   LAUNCHER=submitit_local bash scripts/digits_small.sh   # each sweep job in its own process
#
# Every step is a Hydra multirun (-m) with a fixed sweep dir, so rerunning the script after a crash or
# Ctrl-C resumes: train continues from each run's checkpoint.pt, certify from each certify.tsv.
set -euo pipefail

OUT=${OUT:-outputs/digits_small}
SIGMAS=${SIGMAS:-0.25,0.5,1.0}
BASE_EPOCHS=${BASE_EPOCHS:-30}       # clean fine-tuning of the tiny ViT
EPOCHS=${EPOCHS:-15}                 # LoRA PEFTSmoothing
DENOISER_EPOCHS=${DENOISER_EPOCHS:-10}
N0=${N0:-100}
N=${N:-1000}                         # Monte Carlo samples per image (the paper setting is 100000)
SKIP=${SKIP:-4}                      # every 4th of the 359 test images: 90 images
DEVICE=${DEVICE:-auto}
PS=${PEFTSMOOTH:-peftsmooth}
LAUNCH=(-m)
if [[ -n "${LAUNCHER:-}" ]]; then LAUNCH+=("hydra/launcher=${LAUNCHER}"); fi

# A 16x16 ViT (patch 4, depth 4, width 96) is plenty for 8x8 digits and trains in seconds per epoch.
DATA=(dataset=digits model=vit_tiny model.input_size=16 model.kwargs.img_size=16 "device=${DEVICE}")
FIT=(train.num_workers=0)            # digits live in memory: DataLoader worker processes only cost time
CERT=("certify.n0=${N0}" "certify.n=${N}" "certify.skip=${SKIP}" "device=${DEVICE}")

runs_under() {  # the run directories (holding run.json) below the given dirs, comma-separated
  find "$@" -name run.json -not -path '*/.*' -printf '%h\n' | sort | paste -sd, -
}

echo "== 1. clean base classifier (full fine-tuning, sigma=0)"
# from random init, so not full's fine-tuning default lr (1e-4, for pretrained backbones)
"$PS" train "${LAUNCH[@]}" "${DATA[@]}" "${FIT[@]}" peft=full sigma=0 "train.epochs=${BASE_EPOCHS}" train.lr=1e-3 \
  "hydra.sweep.dir=${OUT}/base"
BASE="${OUT}/base/full_vit_tiny_digits_sigma0"

echo "== 2. LoRA PEFTSmoothing of the base at sigma in {${SIGMAS}}"
"$PS" train "${LAUNCH[@]}" "${DATA[@]}" "${FIT[@]}" peft=lora "base=${BASE}" "sigma=${SIGMAS}" "train.epochs=${EPOCHS}" \
  "hydra.sweep.dir=${OUT}/peft"

echo "== 3. denoised smoothing on the same base: DnCNN trained with the MSE and the stability objective"
"$PS" denoise-baseline "${LAUNCH[@]}" "${DATA[@]}" "${FIT[@]}" "base=${BASE}" denoiser=dncnn \
  denoiser.objective=mse,stability "sigma=${SIGMAS}" "denoiser.epochs=${DENOISER_EPOCHS}" \
  "hydra.sweep.dir=${OUT}/denoise"

echo "== 4. certify every run (n=${N}), and the base without adaptation at every sigma"
"$PS" certify "${LAUNCH[@]}" "run=$(runs_under "${OUT}/peft" "${OUT}/denoise")" "${CERT[@]}" \
  "hydra.sweep.dir=${OUT}/certify_logs/adapted"
"$PS" certify "${LAUNCH[@]}" "run=${BASE}" "sigma=${SIGMAS}" "${CERT[@]}" \
  "hydra.sweep.dir=${OUT}/certify_logs/base"

echo "== 5. one table and one plot"
"$PS" report "${OUT}"
