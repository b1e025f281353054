#!/usr/bin/env bash
# Issue 16's GPU figures, from the repository root of a GPU machine without network. Copy into
# the git-ignored .gpu/ first: the data archive (../shared/data/cifar10-jpeg.tar.xz), the
# airbench sdist (pip download airbench==0.1.8 --no-deps --no-binary :all:) and, for the Muon
# comparison, airbench94_muon.py from KellerJordan/cifar10-airbench (commit 096d14d). Then
#   bash benchmarks/gpu_airbench.sh time        # ~6 min: time to accuracy, 5 seeds each
#   bash benchmarks/gpu_airbench.sh ablation    # ~9 min: airbench94's declared ablation
#   bash benchmarks/gpu_airbench.sh profile     # ~1 min: where the seed recipe's time goes
# Results go under $OUT (default runs/); each part prints its table.
set -euo pipefail
part="${1:?name a part: time, ablation or profile}"
out="${OUT:-runs}"
data=/tmp/c10
mkdir -p "$out" "$data"
[ -d "$data/train" ] || tar -xJf .gpu/cifar10-jpeg.tar.xz -C "$data"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv | tee "$out/gpu.txt"
python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
case "$part" in
time)
    muon=()
    [ -f .gpu/airbench94_muon.py ] && muon=(--airbench-muon .gpu/airbench94_muon.py)
    python benchmarks/time_to_accuracy.py --data-dir "$data" --seeds 5 \
        --recipes airbench94,airbench94_muon,resnet9_cifar10 \
        --airbench-src .gpu/airbench-0.1.8.tar.gz "${muon[@]}" --out "$out/time_to_accuracy"
    ;;
ablation)
    python -m hooktrain ablate airbench94 --mode one-at-a-time --data-dir "$data" \
        --set metrics.progress=false --out "$out/ablation-airbench94"
    cat "$out/ablation-airbench94/ablation.md"
    ;;
profile)
    python benchmarks/profile_recipe.py --data-dir "$data" --recipe resnet9_cifar10 \
        --trace "$out/profile_resnet9_cifar10.json" | tee "$out/profile_resnet9_cifar10.txt"
    ;;
*)
    echo "unknown part $part: use time, ablation or profile" >&2
    exit 2
    ;;
esac
