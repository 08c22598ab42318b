#!/usr/bin/env bash
# Builds .venv-ref: the torch reference environment that makes the test fixtures
# (tests/fixtures/make_*.py) and runs diffusers in benchmarks/run_sd15.py. CI never needs it.
# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-ref
pip=.venv-ref/bin/pip
$pip install -q torch==2.13.0 "transformers<5" diffusers==0.39.0 accelerate safetensors "numpy<2" \
    clip-anytorch k-diffusion scipy torchsde peft "mlx[cpu]"
# PyPI's torchvision does not import beside this torch build and breaks transformers' imports; the
# fixture scripts load the few torchvision-free files they need from these packages by path.
$pip uninstall -q -y torchvision
# The restoration references, without their dependencies (which would replace torch).
$pip install -q --no-deps basicsr==1.4.2 realesrgan==0.3.0 gfpgan==1.3.8 facexlib==0.3.0 \
    opencv-python-headless==4.10.0.84
$pip list 2>/dev/null | grep -E '^torch '
