#!/usr/bin/env bash
# Build the official stack of Hedlin et al.'s correspondence code for the corr-vs-official job.
#
#   benchmarks/reference/ldm/setup.sh REPO [VENV] [TORCH]
#
# REPO: a checkout or a git dir of github ubc-vision/LDM_correspondences; VENV (default
# /tmp/ldm_venv): the venv to create; TORCH (default 2.14.1, the torch sdzero runs on here, so the
# two sides differ only in their code; 2.13.0 is the CPU build the fixture was made with).
# The official files (HEAD) are exported to VENV/LDM_correspondences, their commit to COMMIT there.
set -euo pipefail
repo=${1:?usage: setup.sh REPO [VENV] [TORCH]}
venv=${2:-/tmp/ldm_venv}
torch_version=${3:-2.14.1}
gitdir=$repo
[ -d "$repo/.git" ] && gitdir=$repo/.git
git --git-dir="$gitdir" rev-parse HEAD >/dev/null

"${PYTHON:-python3}" -m venv "$venv"
# diffusers 0.8 / transformers 4.26.1 / huggingface-hub 0.11.1: the official environment.yml's
# pins; tokenizers 0.13.3 is the newest transformers 4.26 accepts; pynvml: imported by
# utils/optimize_token.py. No torchvision: the timed official functions do not use it.
"$venv/bin/pip" install -q "torch==$torch_version" diffusers==0.8.0 transformers==4.26.1 \
    tokenizers==0.13.3 huggingface-hub==0.11.1 numpy==1.26.4 pillow safetensors pynvml tqdm ftfy

code=$venv/LDM_correspondences
rm -rf "$code"
mkdir -p "$code"
git --git-dir="$gitdir" archive HEAD utils | tar -x -C "$code"
git --git-dir="$gitdir" rev-parse HEAD >"$code/COMMIT"
"$venv/bin/python" -c "import torch, diffusers, transformers; print('official stack:', \
torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
echo "official code $(cat "$code/COMMIT") in $code"
