#!/usr/bin/env bash
# Incremental certification end to end on digits (CPU): a LoRA parent at sigma 0.25 and 0.5, certified
# with certify=cohen and certify=sequential (alpha 0.001); its variants (quantized to 8, 4, 2, 1 bits, and
# the adapter rescaled to 0.5 by combine), each certified from scratch (certify=sequential) and
# incrementally from each parent certification, all at alpha_total = 0.002. Resumable: every finished
# step is skipped, an interrupted certification resumes. Then the table (scripts/digits_incremental_table.py).
#
#   OUT=outputs/incremental_digits N=10000 MAX=30 bash scripts/digits_incremental.sh
set -euo pipefail
OUT=${OUT:-outputs/incremental_digits}
N=${N:-10000}
N0=${N0:-100}
SKIP=${SKIP:-6}
MAX=${MAX:-30}
SIGMAS=${SIGMAS:-"0.25 0.5"}
PS=${PEFTSMOOTH:-peftsmooth}
GRID="certify.radius_grid=[0.0,0.25,0.5,0.75,1.0]"
SEL=("certify.n0=${N0}" "certify.skip=${SKIP}" "certify.max=${MAX}" "$GRID" device=cpu)
FIT=(train.num_workers=0 train.batch_size=64 train.precision=bf16)

finished() { [[ -f "$1/run.json" ]] && grep -q '"finished": true' "$1/run.json"; }
complete() { [[ -f "$1/summary.json" ]] && grep -q '"complete": true' "$1/summary.json"; }

if ! finished "$OUT/base"; then
  "$PS" train dataset=digits model=vit_tiny model.input_size=16 model.kwargs.img_size=16 device=cpu peft=full \
    sigma=0 train.epochs=40 train.lr=1e-3 "${FIT[@]}" "hydra.run.dir=$OUT/base"
fi
for s in $SIGMAS; do
  parent="$OUT/lora_s$s"
  finished "$parent" || "$PS" train dataset=digits device=cpu "sigma=$s" "base=$OUT/base" "${FIT[@]}" train.lr=5e-3 \
    peft=lora train.epochs=5 "hydra.run.dir=$parent"
  for b in 8 4 2 1; do
    [[ -d "$parent-${b}bit" ]] || "$PS" quantize "run=$parent" "bits=$b" "out=$parent-${b}bit"
  done
  [[ -d "$parent-x0.5" ]] || "$PS" combine "runs=[$parent]" "weights=[0.5]" "out=$parent-x0.5"
  cert="$OUT/cert/s$s"
  complete "$cert/parent_cohen" || "$PS" certify "run=$parent" certify=cohen "certify.n=$N" certify.alpha=0.001 \
    "${SEL[@]}" "hydra.run.dir=$cert/parent_cohen"
  complete "$cert/parent_sequential" || "$PS" certify "run=$parent" certify=sequential "certify.n_max=$N" \
    certify.alpha=0.001 "${SEL[@]}" "hydra.run.dir=$cert/parent_sequential"
  for v in 8bit 4bit 2bit 1bit x0.5; do
    run="$parent-$v"
    complete "$cert/$v/scratch" || "$PS" certify "run=$run" certify=sequential "certify.n_max=$N" \
      certify.alpha=0.002 "${SEL[@]}" "hydra.run.dir=$cert/$v/scratch"
    for p in cohen sequential; do
      complete "$cert/$v/from_$p" || "$PS" certify "run=$run" certify=incremental "certify.n_max=$N" \
        certify.alpha=0.002 "certify.reference=$cert/parent_$p" "${SEL[@]}" "hydra.run.dir=$cert/$v/from_$p"
    done
  done
done
python "$(dirname "$0")/digits_incremental_table.py" "$OUT/cert"
