#!/usr/bin/env bash
# Reproduce the shipped default model (certseg/weights/street) from nothing.
#
# Each stage fine-tunes the previous one on fresh synthetic scenes (another seed);
# stage 3 grows position-dependent biases (zero at init, so it starts as stage 2).
# Times are from one CPU thread per run on a shared 2-core machine. Every stage
# resumes from its own last.pt, so re-running the script only does what is left.
#
#   bash scripts/train_default_model.sh [runs-folder]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/street}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The README's setup leaves certseg in .venv (not activated): use it when it is there.
CERTSEG=certseg
[[ -x .venv/bin/certseg ]] && CERTSEG=.venv/bin/certseg
COMMON=(--arch lipunet_xs --arch-kwarg width=24 --val-images 64 --height 96 --width 192
        --batch-size 8 --tau 8 --eps 0.1)
POS=(--arch-kwarg 'position_grid=[8,16]')

stage() {  # stage NAME INIT SEED IMAGES EPOCHS LR TRAIN_EPS [extra args...]
  local name=$1 init=$2 seed=$3 images=$4 epochs=$5 lr=$6 eps=$7
  shift 7
  local from=()
  [[ -n $init ]] && from=(--init "$RUNS/$init/model.pt")
  "$CERTSEG" train -o "$RUNS/$name" "${COMMON[@]}" "${from[@]}" --seed "$seed" \
    --num-images "$images" --epochs "$epochs" --lr "$lr" --train-eps "$eps" "$@"
}

stage 1 "" 0 1024 16 3e-3 0.03 --name certseg-street-s24            # 61 min, from scratch
stage 2 1 1 1024 6 1e-3 0.045 --name certseg-street-s24             # 23 min
stage 3 2 2 1024 6 1e-3 0.04 "${POS[@]}" --position-lr-scale 20 --name certseg-street-s24p  # 23 min
stage 4 3 4 1536 4 1e-3 0.03 "${POS[@]}" --position-lr-scale 10 --name certseg-street-s24p  # 23 min
stage 5 4 6 1536 4 1e-3 0.03 "${POS[@]}" --position-lr-scale 10 --name certseg-street-s24p  # 23 min
"$CERTSEG" export "$RUNS/5/model.pt" -o certseg/weights/street --logits  # for worst-case mIoU
cp "$RUNS/5/model.pt" certseg/weights/street/model.pt
