#!/usr/bin/env bash
# Certify one classifier on many GPUs: the test images are split into shards (certify.shard /
# certify.num_shards, image i goes to shard i mod K of the selected images) and the shards are merged
# into one certify.tsv / summary.json / curve.csv / curve.png, identical to a one-process run apart
# from the time column.
#
#   scripts/certify_multigpu.sh local K <certify overrides...>   # one node, K GPUs (torchrun, merged by rank 0)
#   scripts/certify_multigpu.sh slurm K <certify overrides...>   # K SLURM jobs (an array), then merge
#
#   bash scripts/certify_multigpu.sh local 4 run=outputs/cifar10_vit/peft/lora_vit_cifar10_sigma0.5 certify.n=100000 certify.skip=20
#   PARTITION=a100 bash scripts/certify_multigpu.sh slurm 16 run=<run dir> certify.n=100000 certify.skip=20
#
# local: `torchrun --standalone --nproc_per_node=K -m peftsmooth certify ...`; each rank certifies its
#   shard on GPU LOCAL_RANK into <certify dir>/shard<rank>of<K>/, and rank 0 merges into <certify dir>.
#   Several nodes with a shared filesystem: the same command with torchrun's --nnodes/--rdzv options.
# slurm: a Hydra multirun over certify.shard=0..K-1 with hydra/launcher=slurm_gpu (one single-GPU
#   array task per shard; LAUNCHER=submitit_local runs them as local processes), then
#   `peftsmooth merge <certify dir>`. A preempted shard is requeued and resumes from its own TSV;
#   rerunning this script resumes every unfinished shard and merges again.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^(local|slurm)$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
MODE=$1 K=$2
shift 2
PS=${PEFTSMOOTH:-peftsmooth}
TORCHRUN=${TORCHRUN:-torchrun}

if [[ "${MODE}" == local ]]; then
  exec "${TORCHRUN}" --standalone --nproc_per_node="${K}" -m peftsmooth certify "$@"
fi

LAUNCHER=${LAUNCHER:-slurm_gpu}
LAUNCH=("hydra/launcher=${LAUNCHER}")
if [[ "${LAUNCHER}" == slurm* ]]; then
  LAUNCH+=("hydra.launcher.partition=${PARTITION:-gpu}")
  read -r -a extra <<< "${SLURM_EXTRA:-}"
  LAUNCH+=("${extra[@]}")
fi
stamp=$(mktemp)
trap 'rm -f "${stamp}"' EXIT
"${PS}" certify -m "${LAUNCH[@]}" "certify.num_shards=${K}" "certify.shard=range(${K})" "$@"

# The shards just written sit in <certify dir>/shard<i>of<K>/ (inside the run for run=..., else
# under outputs/certify/); merge each certification directory they belong to.
root=outputs/certify
for arg in "$@"; do
  if [[ "${arg}" == run=* ]]; then root=${arg#run=}; fi
done
mapfile -t dirs < <(find "${root}" -name summary.json -path "*/shard*of${K}/summary.json" -newer "${stamp}" \
                      -printf '%h\n' | xargs -r -n1 dirname | sort -u)
if [[ ${#dirs[@]} -eq 0 ]]; then
  echo "certify_multigpu.sh: no shard directories written under ${root}" >&2
  exit 1
fi
for dir in "${dirs[@]}"; do
  "${PS}" merge "${dir}"
done
