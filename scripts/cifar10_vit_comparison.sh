#!/usr/bin/env bash
# CIFAR-10, ViT-B/16 (ImageNet-21k pretrained): PEFTSmoothing vs denoised smoothing, on a SLURM cluster.
#
#   1. clean base: full fine-tuning on clean CIFAR-10 (sigma=0)
#   2. LoRA PEFTSmoothing of that base at sigma = 0.25, 0.5, 1.0 (one GPU job per sigma)
#   3. denoised-smoothing baselines on the same frozen base, at each sigma:
#      DnCNN-MSE, DnCNN Stab+MSE (stability objective started from the MSE denoiser), DDPM one-shot
#   4. certify every run with Cohen et al.'s setting: n0=100, n=100000, alpha=0.001, every 20th test
#      image (500 images); the base without adaptation too ("no adaptation" baseline)
#   5. peftsmooth report -> report.md / report.csv / report.png
#
# Run it from a login node inside tmux/screen: every step is a Hydra multirun whose jobs go to SLURM
# through hydra/launcher=slurm_gpu (a job array per step); the step returns when its jobs are done.
#
#   PARTITION=a100 SLURM_EXTRA="hydra.launcher.account=myproj" bash scripts/cifar10_vit_comparison.sh
#   LAUNCHER=basic bash scripts/cifar10_vit_comparison.sh     # one workstation, jobs one after another
#
# Offline cluster: download once elsewhere and pass DATA_ROOT=/path/with/cifar-10-batches-py,
# VIT_WEIGHTS=/path/vit_base_patch16_224.augreg_in21k.safetensors, DDPM=/path/to/ddpm-cifar10-32.
# Resume: preempted / timed-out jobs are requeued by submitit into the same job directory (see
# conf/hydra/launcher/slurm_gpu.yaml); rerunning this script also resumes, because every sweep dir is
# fixed: train continues from checkpoint.pt, certify skips the images already in its certify.tsv.
set -euo pipefail

OUT=${OUT:-outputs/cifar10_vit}
SIGMAS=${SIGMAS:-0.25,0.5,1.0}
LAUNCHER=${LAUNCHER:-slurm_gpu}
PARTITION=${PARTITION:-gpu}
SLURM_EXTRA=${SLURM_EXTRA:-}         # e.g. "hydra.launcher.account=x hydra.launcher.timeout_min=1440"
N=${N:-100000}
SKIP=${SKIP:-20}
PS=${PEFTSMOOTH:-peftsmooth}

LAUNCH=(-m "hydra/launcher=${LAUNCHER}")
if [[ "${LAUNCHER}" == slurm* ]]; then
  LAUNCH+=("hydra.launcher.partition=${PARTITION}")
  read -r -a extra <<< "${SLURM_EXTRA}"
  LAUNCH+=("${extra[@]}")
fi
DATA=(dataset=cifar10 "dataset.root=${DATA_ROOT:-data}" "dataset.download=${DOWNLOAD:-true}" model=vit)
if [[ -n "${VIT_WEIGHTS:-}" ]]; then DATA+=("model.weights=${VIT_WEIGHTS}"); fi
CERT=(certify.n0=100 "certify.n=${N}" certify.alpha=0.001 "certify.skip=${SKIP}")

runs_under() {  # the run directories (holding run.json) below the given dirs, comma-separated
  find "$@" -name run.json -not -path '*/.*' -printf '%h\n' | sort | paste -sd, -
}
run_at_sigma() {  # the run directory below $1 whose run.json has sigma == $2
  "${PYTHON:-python3}" - "$1" "$2" <<'PY'
import json, pathlib, sys
root, sigma = pathlib.Path(sys.argv[1]), float(sys.argv[2])
hits = [p.parent for p in sorted(root.rglob("run.json")) if float(json.loads(p.read_text())["sigma"]) == sigma]
print(hits[0] if hits else sys.exit(f"no run with sigma={sigma} under {root}"))
PY
}
pids=()
wait_all() {  # wait for the background steps; fail if any of them failed
  for pid in "${pids[@]}"; do wait "${pid}"; done
  pids=()
}

echo "== 1. clean base: full fine-tuning of ViT-B/16 on CIFAR-10, sigma=0"
"$PS" train "${LAUNCH[@]}" "${DATA[@]}" peft=full sigma=0 "hydra.sweep.dir=${OUT}/base"
BASE="${OUT}/base/full_vit_cifar10_sigma0"

echo "== 2+3. LoRA PEFTSmoothing and the denoisers, in parallel (each waits for its own jobs)"
"$PS" train "${LAUNCH[@]}" "${DATA[@]}" peft=lora "base=${BASE}" "sigma=${SIGMAS}" \
  "hydra.sweep.dir=${OUT}/peft" & pids+=($!)
"$PS" denoise-baseline "${LAUNCH[@]}" "${DATA[@]}" "base=${BASE}" denoiser=ddpm \
  "denoiser.pretrained=${DDPM:-google/ddpm-cifar10-32}" "sigma=${SIGMAS}" "hydra.sweep.dir=${OUT}/ddpm" & pids+=($!)
"$PS" denoise-baseline "${LAUNCH[@]}" "${DATA[@]}" "base=${BASE}" denoiser=dncnn denoiser.objective=mse \
  "sigma=${SIGMAS}" "hydra.sweep.dir=${OUT}/dncnn_mse"
for sigma in ${SIGMAS//,/ }; do   # Stab+MSE: the stability objective, started from the MSE denoiser
  "$PS" denoise-baseline "${LAUNCH[@]}" "${DATA[@]}" "base=${BASE}" denoiser=dncnn \
    denoiser.objective=stability "denoiser.init=$(run_at_sigma "${OUT}/dncnn_mse" "${sigma}")" \
    "sigma=${sigma}" "hydra.sweep.dir=${OUT}/dncnn_stab_mse" & pids+=($!)
done
wait_all

echo "== 4. certify (n=${N}, every ${SKIP}th test image) every run, and the unadapted base at every sigma"
"$PS" certify "${LAUNCH[@]}" "run=$(runs_under "${OUT}/peft" "${OUT}/ddpm" "${OUT}/dncnn_mse" "${OUT}/dncnn_stab_mse")" \
  "${CERT[@]}" "hydra.sweep.dir=${OUT}/certify_logs/adapted" & pids+=($!)
"$PS" certify "${LAUNCH[@]}" "run=${BASE}" "sigma=${SIGMAS}" "${CERT[@]}" \
  "hydra.sweep.dir=${OUT}/certify_logs/base" & pids+=($!)
wait_all

echo "== 5. report"
"$PS" report "${OUT}"
