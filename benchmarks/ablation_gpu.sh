#!/usr/bin/env bash
# Issue 3's figures on a GPU machine, from the repository root, with the data archive copied
# into the git-ignored .data/ (the GPU machine has no network):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.xz .data/
#   bash benchmarks/ablation_gpu.sh            # results under $OUT (or ./runs)
# 1. the seed recipe's declared ablation: grad_clip on/off x weight_decay on/off, 3 seeds each,
#    one after another (bf16, as the recipe runs on CUDA);
# 2. --parallel-seeds 4 against 4 runs one after another, on a small recipe, in fp32.
set -euo pipefail
out="${OUT:-runs}"
[ -d .data/train ] || tar -xJf .data/cifar10-jpeg.tar.xz -C .data
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m hooktrain ablate resnet9_cifar10 --data-dir .data \
    --set metrics.progress=false --out "$out/ablation-resnet9"
cat "$out/ablation-resnet9/ablation.md"
# Seeds together refuse bf16 autocast (vmap mixes dtypes under it): both arms run in fp32.
python benchmarks/parallel_seeds.py --data-dir .data --seeds 4 --repeats 3 \
    --set precision=fp32 | tee "$out/parallel_seeds.txt"
