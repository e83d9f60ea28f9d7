#!/bin/bash
# The demo model's next build on a GPU machine (issue 16: what the 2-core CPU cannot buy), prepared for the
# device tool's `run` (one command, at most 10 minutes, files back through $OUT: at most 8 files of 16 MiB).
#
# Here, once, in the repository's root (diffusers is not in that machine's image; the rest of what the build
# imports is):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# Then: run(command="bash benchmarks/gpu_build.sh 8 [BUILD OPTIONS...]", carry=[".whl"], timeout_s=600)
# and here: cat /work/.device/.../demo-model.tar.part-* | tar -x -C /tmp/gpu && studio eval --model
# /tmp/gpu/demo-model --held-out 12 --seed 3 --prompts 80 (the CPU evaluates: the figures stay comparable).
#
# What it builds: build 5 continued (its text encoder, UNet and VAE) on world v2 with the 256 named individuals
# (each to be seen ~2,000 times: what 32 names needed on the CPU to be learnt), at batch 256 (8x the CPU build's) for
# MINUTES minutes; on the CPU 6,490 steps of batch 32 took 50 minutes on one core. Pyramid noise is left out: on
# the CPU it cost colour and did not clearly help position (docs/demo-model.md, session 9).
set -euo pipefail
MINUTES=${1:-8}
shift || true  # the rest: extra build options, e.g. a world v3 lever: --look-code 1.0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -m studio.demo.build --out /tmp/gpu/demo-model --vae assets/demo-model/vae --init-from assets/demo-model \
    --noise-offset 0.1 --toy-rate 0.5 --named-rate 0.6 --batch 256 --lr 5e-4 \
    --minutes "$MINUTES" --snapshot-minutes 0 --device cuda "$@" 2>&1 | tee "$OUT/build.log" | grep -v "^unet step [0-9]*[1-9]00 "
tar -C /tmp/gpu -cf /tmp/gpu/demo-model.tar demo-model
split -b 15M /tmp/gpu/demo-model.tar "$OUT/demo-model.tar.part-"
ls -l "$OUT"
