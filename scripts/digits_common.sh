# Shared by scripts/digits_methods.sh and scripts/digits_objectives.sh (sourced, after OUT is set):
# the digits data and fit settings, the certification every run gets, and the resumable steps.
# Knobs: N0, N, SKIP, MAX (certification), BASE_EPOCHS, PEFTSMOOTH (the command).

N0=${N0:-100}
N=${N:-1000}
SKIP=${SKIP:-6}
MAX=${MAX:-60}
BASE_EPOCHS=${BASE_EPOCHS:-40}
PS=${PEFTSMOOTH:-peftsmooth}

VIT=(dataset=digits model=vit_tiny model.input_size=16 model.kwargs.img_size=16 device=cpu)
FIT=(train.num_workers=0 train.batch_size=64 train.precision=bf16)

finished() { [[ -f "$1/run.json" ]] && grep -q '"finished": true' "$1/run.json"; }

certify() {  # name: certify ${OUT}/runs/<name> into ${OUT}/certify/<name> (skipped when done)
  local name=$1
  [[ -f "${OUT}/certify/${name}/summary.json" ]] && return 0
  echo "== certify ${name}"
  "$PS" certify "run=${OUT}/runs/${name}" "certify.n0=${N0}" "certify.n=${N}" "certify.skip=${SKIP}" \
    "certify.max=${MAX}" device=cpu "hydra.run.dir=${OUT}/certify/${name}"
}

# dir, model overrides...: full fine-tuning at sigma=0, skipped when finished
# (from random init, so train.lr=1e-3, not full's 1e-4 for pretrained backbones)
clean_base() {
  local dir=$1; shift
  finished "$dir" && return 0
  echo "== clean base ${dir} (full fine-tuning, sigma=0, ${BASE_EPOCHS} epochs)"
  "$PS" train "${FIT[@]}" "$@" peft=full sigma=0 "train.epochs=${BASE_EPOCHS}" train.lr=1e-3 "hydra.run.dir=${dir}"
}
