#!/usr/bin/env bash
# Prepare the GPU check on a machine WITH the package registry and espeak-ng (the GPU machine has
# neither): wheels of the packages its image lacks, a small synthetic STOP corpus, weight-free model
# kits (config + tokenizer + feature extractor of whisper-base and tiny.en) and the bench's spoken
# utterances. Everything lands in ignored folders (.whl/, runs/gpu-check/) that the device call
# carries:  run(command="bash recipes/gpu/check.sh", carry=[".whl", "runs/gpu-check"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=runs/gpu-check
mkdir -p "$KIT" .whl

# 1. wheels (Python 3.12, x86-64) of what the GPU image does not hold, at the versions tested here
pkgs=()
for name in jiwer rapidfuzz soundfile cffi pycparser datasets dill multiprocess jsonargparse docstring_parser \
            typeshed_client; do
    pkgs+=("$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pkgs[@]}"

# 2. a small corpus: demo text (alarm, timer, weather), several voices, STOP layout
python3 -m conslu synth conslu/assets/demo/*_train.tsv conslu/assets/demo/*_eval.tsv --out "$KIT/corpus" \
    --limit 256 --noise-snr none 30

# 3. weight-free kits and 4. the bench's utterances, spoken here
python3 recipes/gpu/check.py prepare --kit "$KIT"
du -sh .whl "$KIT"
