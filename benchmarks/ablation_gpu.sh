#!/usr/bin/env bash
# Issue 3's figures on a GPU machine, from the repository root, with the data archive copied
# into the git-ignored .data/ (the GPU machine has no network):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.xz .data/
#   bash benchmarks/ablation_gpu.sh            # results under $OUT (or ./runs)
# 1. the seed recipe's declared ablation: grad_clip on/off x weight_decay on/off, 3 seeds each,
#    the three seeds of a cell trained together;
# 2. --parallel-seeds 4 against 4 runs one after another, on a small recipe.
set -euo pipefail
out="${OUT:-runs}"
[ -d .data/train ] || tar -xJf .data/cifar10-jpeg.tar.xz -C .data
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m hooktrain ablate resnet9_cifar10 --data-dir .data --parallel-seeds 3 \
    --set metrics.progress=false --out "$out/ablation-resnet9"
cat "$out/ablation-resnet9/ablation.md"
python benchmarks/parallel_seeds.py --data-dir .data --seeds 4 --repeats 3 | tee "$out/parallel_seeds.txt"
