#!/usr/bin/env bash
# The paper's three applications at CPU toy scale (32^3, the demo preset's small HA-GAN), on the
# procedural phantoms and on the real data in ../shared/data. Run it with OMP_NUM_THREADS=1 when
# another job shares the cores. Every number in docs/experiments.md's
# CPU section comes from this script; results land in runs/experiments/NAME/results.json.
#
#   bash experiments/applications_cpu.sh [OUT]        (about an hour on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/experiments}
DATA=${HAGAN_DATA:-../shared/data}
SEEDS="0 1 2 3 4"

# Phantoms (thorax CT, 60 volumes, severity grade as the class): one class-conditional HA-GAN for all three.
hagan experiment augmentation --data phantoms --n 60 --out "$OUT/phantoms-augmentation" --device cpu \
    --seeds $SEEDS --epochs 20 --classifier-width 0.5
PHANTOM_RUN="$OUT/phantoms-augmentation/run"
hagan experiment features --data phantoms --n 60 --run "$PHANTOM_RUN" --out "$OUT/phantoms-features" --device cpu \
    --seeds $SEEDS
hagan experiment features --data phantoms --n 60 --run "$PHANTOM_RUN" --out "$OUT/phantoms-features-auto" \
    --device cpu --seeds $SEEDS --alpha auto
for FIT in "--reference random" "--reference encoded" "--fit-on generated"; do
    NAME=$(echo "$FIT" | awk '{print $2}')
    hagan experiment latent-walk --data phantoms --n 60 --run "$PHANTOM_RUN" --out "$OUT/phantoms-latent-walk-$NAME" \
        --device cpu --class 0 $FIT
done

# IXI T1 (143 heads at 32^3): Table VI's measurements on an unconditional HA-GAN's codes, and the ventricle walk.
[ -d "$OUT/ixi32" ] || hagan preprocess "$DATA/ixi-t1-2mm/t1" "$OUT/ixi32" --recipe mri --size 32
IXI_TABLES=(--table "$DATA/ixi-t1-2mm/demographics.csv" --table "$DATA/ixi-t1-2mm/dlmuse_roi_volumes.csv")
hagan experiment features --data "$OUT/ixi32" "${IXI_TABLES[@]}" --out "$OUT/ixi-features" --device cpu \
    --targets age=Age icv=702 brain=701 ventricles=509 --seeds $SEEDS
hagan experiment features --data "$OUT/ixi32" "${IXI_TABLES[@]}" --run "$OUT/ixi-features/run" \
    --out "$OUT/ixi-features-auto" --device cpu --targets age=Age icv=702 brain=701 ventricles=509 --seeds $SEEDS --alpha auto
for FIT in "--reference random" "--fit-on generated"; do
    NAME=$(echo "$FIT" | awk '{print $2}')
    hagan experiment latent-walk --data "$OUT/ixi32" "${IXI_TABLES[@]}" --run "$OUT/ixi-features/run" \
        --out "$OUT/ixi-latent-walk-$NAME" --device cpu --target ventricles=509 --tissue csf $FIT
done

# AdrenalMNIST3D (official splits, masks at 32^3): real vs real + 20% synthetic, 5 epochs to fit a CPU.
hagan experiment augmentation --data "$DATA/adrenalmnist3d/adrenalmnist3d_64.npz" --out "$OUT/adrenal-augmentation" \
    --device cpu --seeds 0 1 2 --epochs 5 --classifier-width 0.5
