"""Reliability across the toolkit: bad inputs, interruptions, data safety.

Cross-module, end-to-end cases (through ``conslu.cli.main``) that the per-module suites do not
cover. Already covered elsewhere and not repeated here:

* ``load_audio`` on every bad/odd file kind: tests/test_audio.py; ``conslu parse`` with empty,
  text, missing and directory inputs, ``--debug`` tracebacks, resumable ``--out`` and a real
  SIGKILL of ``parse``: tests/test_parse.py.
* ``evaluate`` with an empty and a missing audio file and a simulated stop + resume:
  tests/test_evaluate.py.
* reader errors (``file:line``) and ``skip_bad`` at the API level: tests/test_data.py;
  ``grammar extract --skip-bad``: tests/test_grammar.py; ``synth`` bad rows, ``--skip-bad`` and a
  real SIGKILL + resume to a byte-identical corpus: tests/test_synth.py
  (``test_killed_process_resumes_to_identical_corpus``).
* training resumed from ``last.ckpt`` at the same step, optimizer, scheduler and batch order:
  tests/test_train.py (``test_resume_continues_from_same_step``); atomic ``export_model``:
  tests/test_train.py; model folder refusals at the API level: tests/test_model.py.

Sections: audio, data, models, interruption, atomic writes, safety.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from parse_fixtures import FakeModel, strip_timing, write_wav
from test_evaluate import HEADER as STOP_HEADER, _model_dir as model_dir, answers, fake, make_corpus  # noqa: F401

from conslu import audio as audio_mod
from conslu.cli import main

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "conslu"
GRAMMAR = REPO / "grammar" / "topv2.json"
SR = 16000


def tone(seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)




@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real (tiny, random) ConSLU folder, saved once for the module."""
    from slu_fixtures import tiny_conslu

    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_conslu(0).save_pretrained(out)
    return out


def err_lines(err: str) -> list[str]:
    return [ln for ln in err.strip().splitlines() if ln.strip()]


# =============================================================================================
# audio: every odd-but-valid file is parsed, every bad one is one line, the run goes on


def odd_valid_files(d: Path) -> dict[str, tuple[str, int]]:
    """name -> (path, samples the model must receive at 16 kHz)."""
    d.mkdir(parents=True, exist_ok=True)
    made = {}
    sf.write(d / "rate8k.wav", tone(1.0, 8000), 8000, subtype="PCM_16")
    made["8k"] = (str(d / "rate8k.wav"), SR)
    sf.write(d / "rate44k.wav", tone(0.5, 44100), 44100, subtype="PCM_16")
    made["44.1k"] = (str(d / "rate44k.wav"), SR // 2)
    x = tone(0.75, SR)
    sf.write(d / "stereo.wav", np.stack([x, -x], axis=1), SR, subtype="PCM_16")
    made["stereo"] = (str(d / "stereo.wav"), len(x))
    sf.write(d / "deep24.wav", tone(0.6, SR), SR, subtype="PCM_24")
    made["24-bit"] = (str(d / "deep24.wav"), int(0.6 * SR))
    sf.write(d / "silence.wav", np.zeros(int(0.7 * SR), np.float32), SR, subtype="PCM_16")
    made["silence"] = (str(d / "silence.wav"), int(0.7 * SR))
    sf.write(d / "clipped.wav", np.clip(tone(0.8, SR, amp=3.0), -1, 1), SR, subtype="PCM_16")
    made["clipped"] = (str(d / "clipped.wav"), int(0.8 * SR))
    return made


def bad_files(d: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, fragment of the reason). Kinds test_parse.py does not run through the CLI."""
    d.mkdir(parents=True, exist_ok=True)
    good = write_wav(d / "donor.wav", SR)
    data = good.read_bytes()
    good.unlink()
    (d / "truncated.wav").write_bytes(data[: len(data) // 2])
    (d / "header_only.wav").write_bytes(data[:20])
    (d / "garbage.wav").write_bytes(data[:12] + bytes(range(256)) * 2)
    (d / "clip.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(300))
    sf.write(d / "long.wav", np.zeros(31 * 8000, np.float32), 8000, subtype="PCM_16")
    write_wav(d / "secret.wav", 4000)
    (d / "empty.wav").write_bytes(b"")
    (d / "readme.wav").write_text("not audio at all\n")
    return {
        "truncated": (str(d / "truncated.wav"), "truncated wav"),
        "header only": (str(d / "header_only.wav"), "corrupt wav"),
        "corrupt": (str(d / "garbage.wav"), ""),
        "unsupported": (str(d / "clip.m4a"), "unsupported audio format"),
        "too long": (str(d / "long.wav"), "31.0 s long"),
        "unreadable": (str(d / "secret.wav"), "permission denied"),
        "empty": (str(d / "empty.wav"), "empty file"),
        "text": (str(d / "readme.wav"), "not audio"),
        "missing": (str(d / "nowhere.wav"), "no such file"),
        "directory": (str(d), "is a directory"),
    }


@pytest.fixture
def deny(monkeypatch):
    """Make one path unreadable. We run as root in CI (file modes are ignored), so open() is made to
    raise what it raises for everyone else; as a normal user the mode is really set to 0."""
    held: list[Path] = []

    def apply(path: str) -> None:
        p = Path(path)
        if os.geteuid() != 0:
            p.chmod(0)
            held.append(p)
            return
        real_open = open

        def guarded(file, *a, **k):
            if isinstance(file, (str, os.PathLike)) and Path(file) == p:
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(file, *a, **k)

        monkeypatch.setattr(audio_mod, "open", guarded, raising=False)

    yield apply
    for p in held:
        p.chmod(0o644)


def test_parse_cli_odd_files_parsed_bad_files_one_line_each(fake, tmp_path, capsys, deny):
    odd = odd_valid_files(tmp_path / "odd")
    bad = bad_files(tmp_path / "bad")
    deny(bad["unreadable"][0])
    files = []
    for (o, b) in zip(list(odd.values()) + [None] * 10, bad.values()):  # interleave good and bad
        if o:
            files.append(o[0])
        files.append(b[0])
    model = fake(FakeModel())
    rc = main(["parse", *files, "--model", str(model_dir(tmp_path)), "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert rc == 1
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert [r["file"] for r in rows] == [p for p, _ in odd.values()]
    # resampled to 16 kHz mono float32 (FakeModel asserts dtype/ndim) with the right length
    got = [n for c in model.calls for n in c["lengths"]]
    for (name, (_, n)), g in zip(odd.items(), got):
        assert abs(g - n) <= 2, name
    lines = err_lines(err)
    assert "Traceback" not in err
    for name, (path, reason) in bad.items():
        mine = [ln for ln in lines if ln.startswith(f"conslu: {path}: ")]
        assert len(mine) == 1, (name, lines)
        assert reason in mine[0], (name, mine[0])
    assert lines[-1] == f"conslu: {len(bad)} of {len(files)} files failed"
    assert len([ln for ln in lines if ln.startswith("conslu: ")]) == len(bad) + 1  # (plus the progress bar)


def test_evaluate_cli_bad_and_odd_audio_in_a_corpus(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop")
    root = tmp_path / "stop"
    # replace some recordings: odd-but-valid ones must be decoded, broken ones fail one line each
    p = lambda i: root / rows[i]["file_id"]  # noqa: E731
    sf.write(p(0), np.stack([tone(0.5, 44100)] * 2, axis=1), 44100, subtype="PCM_24")
    data = p(1).read_bytes()
    p(1).write_bytes(data[: len(data) // 2])
    p(2).write_text("oops, a text file\n")
    sf.write(p(3), np.zeros(31 * 8000, np.float32), 8000, subtype="PCM_16")
    sf.write(p(4), np.zeros(4000, np.float32), 8000, subtype="PCM_16")  # 0.5 s of silence at 8 kHz
    model = fake(FakeModel(answers(rows)))
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(root), "--model", str(model_dir(tmp_path)), "--json",
               "--out", str(out_file), "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    res = json.loads(out)
    assert res["n"] == 7 and res["failed"] == 3 and res["missing"]["count"] == 3
    assert sum(c["n"] for c in model.calls) == 4
    assert [n for c in model.calls for n in c["lengths"]].count(8000) == 2  # 44.1 kHz and 8 kHz, 0.5 s each
    lines = err_lines(err)
    assert "Traceback" not in err
    for i, reason in ((1, "truncated wav"), (2, "not audio"), (3, "31.0 s long")):
        mine = [ln for ln in lines if str(p(i)) in ln]
        assert len(mine) == 1 and reason in mine[0], (i, lines)
    assert lines[-1] == "conslu: 3 of 7 utterances failed"
    assert [r["id"] for r in strip_timing(out_file)] == [rows[i]["file_id"] for i in (0, 4, 5, 6)]


@pytest.mark.slow
def test_real_tiny_model_evaluates_odd_files_and_skips_bad_ones(tiny_model_dir, tmp_path, capsys):
    """The one run with a real (tiny random) ConSLU: odd-but-valid audio decodes, broken audio fails."""
    rows = make_corpus(tmp_path / "stop")
    root = tmp_path / "stop"
    p = lambda i: root / rows[i]["file_id"]  # noqa: E731
    sf.write(p(0), np.stack([tone(0.5, 44100)] * 2, axis=1), 44100, subtype="PCM_24")
    sf.write(p(1), np.clip(tone(0.5, 8000, amp=4.0), -1, 1), 8000, subtype="PCM_16")
    p(2).write_text("text\n")
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(root), "--model", str(tiny_model_dir), "--json", "--out", str(out_file),
               "--limit", "4", "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "decoding failed" not in err and "Traceback" not in err
    res = json.loads(out)
    assert res["n"] == 4 and res["failed"] == 1
    preds = strip_timing(out_file)
    assert [r["id"] for r in preds] == [rows[i]["file_id"] for i in (0, 1, 3)]
    assert all(isinstance(r["transcript"], str) and isinstance(r["valid"], bool) for r in preds)
    assert err_lines(err)[-1] == "conslu: 1 of 4 utterances failed"


# =============================================================================================
# data: bad manifest rows are one clear line with file:line, or skipped and reported


def stop_manifest(root: Path, split: str, rows: list[list[str]], header=STOP_HEADER) -> Path:
    m = root / "manifests" / f"{split}.tsv"
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text("\n".join("\t".join(r) for r in [list(header), *rows]) + "\n", encoding="utf-8")
    return m


def _row(file_id: str, text: str, lf: str, domain: str = "weather") -> list[str]:
    return [file_id, domain, "female", "yes", text, lf, text, lf, lf]


def test_evaluate_bad_rows_fail_with_file_line_or_are_skipped(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop")
    root = tmp_path / "stop"
    m = root / "manifests" / "test.tsv"
    lines = m.read_text().splitlines()
    lines.insert(3, "\t".join(_row("test_0/weather_test/bad.wav", "what", "[IN:GET_WEATHER what")))  # line 4
    lines.append(lines[1])  # duplicated id, last line (10)
    m.write_text("\n".join(lines) + "\n")
    mdir = model_dir(tmp_path)
    fake(FakeModel(answers(rows)))
    base = ["evaluate", "--data", str(root), "--model", str(mdir), "--json", "--out", str(tmp_path / "p.jsonl")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err_lines(err) == [ln for ln in err_lines(err) if ln.startswith("conslu: ")] and len(err_lines(err)) == 1
    assert f"{m}:4: decoupled_normalized_seqlogical: malformed tree at char" in err and "Traceback" not in err
    assert not (tmp_path / "p.jsonl").exists()  # nothing decoded on bad data
    assert main([*base, "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 7
    assert f"conslu: skipped {m}:4: " in err and f"conslu: skipped {m}:10: duplicated id" in err
    assert "conslu: 2 bad manifest row(s) skipped (not scored)" in err


def test_evaluate_missing_columns_is_one_line(fake, tmp_path, capsys):
    root = tmp_path / "stop"
    m = stop_manifest(root, "test", [["x.wav", "weather"]], header=["file_id", "domain"])
    fake(FakeModel())
    assert main(["evaluate", "--data", str(root), "--model", str(model_dir(tmp_path)), "--out",
                 str(tmp_path / "p.jsonl")]) == 2
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"conslu: {m}:1: missing column(s)")


def test_evaluate_unknown_label_in_reference_is_scored_not_refused(fake, tmp_path, capsys):
    """A reference whose label the model's grammar lacks: scored normally (the prediction cannot match)."""
    rows = make_corpus(tmp_path / "stop")
    root = tmp_path / "stop"
    m = root / "manifests" / "test.tsv"
    m.write_text(m.read_text().replace("[IN:SNOOZE_ALARM ]", "[IN:BRAND_NEW_INTENT ]"))
    fake(FakeModel(answers(rows)))  # answers the old tree for that row
    rc = main(["evaluate", "--data", str(root), "--model", str(model_dir(tmp_path)), "--json",
               "--out", str(tmp_path / "p.jsonl")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == 7 and res["em"] == pytest.approx(6 / 7) and res["validity"] == 1.0


def test_grammar_extract_and_synth_missing_columns(tmp_path, capsys):
    bad = tmp_path / "weather_train.tsv"
    bad.write_text("domain\ttext\nweather\thello\n")
    out = tmp_path / "g.json"
    assert main(["grammar", "extract", str(bad), "--out", str(out)]) == 2
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(bad) in lines[0] and not out.exists()
    root = tmp_path / "stop"
    m = stop_manifest(root, "eval", [["a.wav", "alarm"]], header=["file_id", "domain"])
    assert main(["synth", str(m), "--out", str(tmp_path / "corpus")]) != 0
    lines = err_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{m}:1: missing column(s)" in lines[0]
    assert not (tmp_path / "corpus" / "manifests").exists()


def train_corpus(root: Path) -> Path:
    """A STOP root with a good train split plus a malformed row, a missing audio file, a duplicate id."""
    good = [("train/weather_train/0.wav", "what is the weather", "[IN:GET_WEATHER ]"),
            ("train/alarm_train/1.wav", "delete my alarm", "[IN:DELETE_ALARM ]"),
            ("train/weather_train/2.wav", "new thing", "[IN:NOT_IN_GRAMMAR [SL:LOCATION thing ] ]")]
    for fid, _, _ in good:
        write_wav(root / fid, 3200)
    rows = [_row(f, t, lf) for f, t, lf in good]
    rows.insert(1, _row("train/weather_train/bad.wav", "x", "[IN:GET_WEATHER x"))   # line 3: malformed
    rows.append(_row("train/weather_train/gone.wav", "rain", "[IN:GET_WEATHER ]"))  # line 6: no audio
    rows.append(_row(*good[0]))                                                      # line 7: duplicate
    stop_manifest(root, "train", rows)
    stop_manifest(root, "eval", [_row("train/weather_train/0.wav", "what is the weather", "[IN:GET_WEATHER ]")])
    return root


def test_training_data_module_bad_rows_and_unknown_labels(tmp_path, capsys):
    from conslu.data import DataError
    from conslu.training import SLUDataModule

    root = train_corpus(tmp_path / "stop")
    m = root / "manifests" / "train.tsv"
    with pytest.raises(DataError, match=rf"{m}:3: decoupled_normalized_seqlogical: malformed tree"):
        SLUDataModule(str(root)).setup("fit")
    dm = SLUDataModule(str(root), skip_bad=True)
    dm.setup("fit")
    err = capsys.readouterr().err
    assert [r["id"] for r in dm.train_rows] == ["train/weather_train/0.wav", "train/alarm_train/1.wav",
                                                 "train/weather_train/2.wav"]
    assert f"conslu train: skipped {m}:3: " in err and f"{m}:6: audio file not found" in err
    assert f"{m}:7: duplicated id" in err and "3 bad 'train' row(s) skipped" in err
    # a label the model's grammar lacks: refused before training with manifest:line ...
    from slu_fixtures import tiny_conslu

    slu = tiny_conslu(0)
    strict = SLUDataModule(str(root))
    strict.train_rows = list(dm.train_rows)
    with pytest.raises(DataError, match=rf"{m}:5: label\(s\) IN:NOT_IN_GRAMMAR not in the model's grammar"):
        strict.connect(slu)
    # ... or left out and reported with skip_bad
    dm.connect(slu)
    assert [r["id"] for r in dm.train_rows] == ["train/weather_train/0.wav", "train/alarm_train/1.wav"]
    assert f"conslu train: skipped {m}:5: label(s) IN:NOT_IN_GRAMMAR" in capsys.readouterr().err
    # a tree whose words are not whole-word copies of the transcript: refused, never a silent fallback
    uncopyable = SLUDataModule(str(root))
    first = dict(dm.train_rows[0], logical_form="[IN:GET_WEATHER [SL:LOCATION paris ] ]")
    uncopyable.train_rows = [first, dict(dm.train_rows[1])]
    with pytest.raises(DataError, match=r"the tree's words are not whole-word, in-order copies of the transcript"):
        uncopyable.connect(slu)
    half = dict(dm.train_rows[0])
    words = half["transcript"].split()
    assert len(words[0]) > 2
    half["logical_form"] = f"[IN:GET_WEATHER [SL:LOCATION {words[0][:2]} ] ]"  # part of a word
    lenient = SLUDataModule(str(root), skip_bad=True)
    lenient.train_rows = [half, dict(dm.train_rows[1])]
    lenient.connect(slu)
    assert [r["id"] for r in lenient.train_rows] == [dm.train_rows[1]["id"]]
    assert "not whole-word, in-order copies" in capsys.readouterr().err
    # WhiSLU targets are plain text: no label check
    whislu = SLUDataModule(str(root))
    whislu.train_rows = [{"id": "x", "logical_form": "[IN:ANYTHING ]"}]
    whislu.connect(tiny_conslu(0, target_format="whislu", constraints="none"))
    assert len(whislu.train_rows) == 1


# =============================================================================================
# models: folders that do not fit together are refused with one line (real from_pretrained)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _parse_with(model: Path, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    wav = write_wav(tmp_path / "one.wav", 4000)
    rc = main(["parse", str(wav), "--model", str(model), "--device", "cpu", "--max-new-tokens", "4"])
    return rc, err_lines(capsys.readouterr().err)


def test_model_folder_without_grammar_is_refused(tiny_model_dir, tmp_path, capsys):
    bad = _copy(tiny_model_dir, tmp_path / "nogrammar")
    (bad / "grammar.json").unlink()
    rc, lines = _parse_with(bad, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "no grammar.json" in lines[0] and str(bad) in lines[0]


def test_grammar_not_matching_label_tokens_is_refused(tiny_model_dir, tmp_path, capsys):
    from conslu.grammar import Grammar

    bad = _copy(tiny_model_dir, tmp_path / "othergrammar")
    small = Grammar.extract([])
    small.save(bad / "grammar.json")
    rc, lines = _parse_with(bad, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "does not match the tokenizer's label tokens" in lines[0]


def test_whislu_checkpoint_labelled_simplified_is_refused(tmp_path, capsys):
    from slu_fixtures import tiny_conslu

    folder = tiny_conslu(0, target_format="whislu", constraints="none").save_pretrained(tmp_path / "wh")
    cfg = json.loads((folder / "conslu.json").read_text())
    cfg.update(target_format="simplified", constraints="both")
    (folder / "conslu.json").write_text(json.dumps(cfg))
    rc, lines = _parse_with(folder, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and str(folder) in lines[0]


def test_simplified_checkpoint_labelled_whislu_is_refused(tiny_model_dir, tmp_path, capsys):
    bad = _copy(tiny_model_dir, tmp_path / "relabelled")
    cfg = json.loads((bad / "conslu.json").read_text())
    cfg.update(target_format="whislu", constraints="none")
    (bad / "conslu.json").write_text(json.dumps(cfg))
    rc, lines = _parse_with(bad, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1


def test_training_checkpoint_of_another_target_format_is_refused():
    from conslu.grammar import Grammar
    from conslu.training import SLUModule

    g = Grammar.load(GRAMMAR)
    module = SLUModule.__new__(SLUModule)  # only the hook is exercised; no model is built
    module.slu = SimpleNamespace(target_format="simplified", grammar=g)
    with pytest.raises(ValueError, match="trained with target format 'whislu', this run uses 'simplified'"):
        SLUModule.on_load_checkpoint(module, {"conslu": {"target_format": "whislu", "grammar": g.to_dict()}})
    small = Grammar.extract([])
    with pytest.raises(ValueError, match="another grammar"):
        SLUModule.on_load_checkpoint(module, {"conslu": {"target_format": "simplified", "grammar": {
            **small.to_dict(), "intents": ["IN:ONLY"]}}})
    SLUModule.on_load_checkpoint(module, {"conslu": {"target_format": "simplified", "grammar": g.to_dict()}})
    SLUModule.on_load_checkpoint(module, {})  # checkpoints of older versions carry no record


# =============================================================================================
# interruption: a real SIGKILL of `evaluate`, then a rerun, equals an uninterrupted run


SLOW_EVAL = """
import sys, time
sys.path.insert(0, {tests!r})
import conslu.parse
from conslu.grammar import Grammar
from parse_fixtures import FakeModel
class Slow(FakeModel):
    def parse(self, audios, options=None):
        time.sleep(float(sys.argv[1]))
        return super().parse(audios, options)
import json
table = {{int(k): tuple(v) for k, v in json.loads(open(sys.argv[2]).read()).items()}}
conslu.parse.load_model = lambda *a, **k: Slow(table, grammar=Grammar.load({grammar!r}))
from conslu.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_evaluate_sigkill_and_rerun_equals_uninterrupted(tmp_path):
    rows = make_corpus(tmp_path / "stop")
    table = tmp_path / "answers.json"
    table.write_text(json.dumps({str(k): v for k, v in answers(rows, wrong=2).items()}))
    script = tmp_path / "slow_eval.py"
    script.write_text(SLOW_EVAL.format(tests=str(Path(__file__).parent), grammar=str(GRAMMAR)))
    mdir = model_dir(tmp_path)

    def args(out: Path) -> list[str]:
        return ["evaluate", "--data", str(tmp_path / "stop"), "--model", str(mdir), "--batch-size", "1",
                "--out", str(out), "--json"]

    ref = tmp_path / "ref.jsonl"
    full = subprocess.run([sys.executable, str(script), "0", str(table), *args(ref)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "pred.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), "0.3", str(table), *args(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= out.read_text().count("\n") < len(rows), "not interrupted mid-run"
    with open(out, "a") as f:  # a kill in the middle of a line
        f.write('{"id": "test_0/al')
    again = subprocess.run([sys.executable, str(script), "0", str(table), *args(out)], capture_output=True,
                           text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "dropped an incomplete last line" in again.stderr
    assert strip_timing(out) == strip_timing(ref)  # same lines, same order, no duplicates
    assert json.loads(again.stdout)["em"] == json.loads(full.stdout)["em"] == pytest.approx(6 / 7)


def test_train_interrupt_exits_130_and_loads_checkpoints_weights_only(monkeypatch, capsys):
    """Cross-check of `conslu train` (the resume itself: test_train.py::test_resume_continues_from_same_step).
    Lightning loads .ckpt files with torch.load; training passes weights_only=True so neither torch's
    default nor TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD can make it unpickle code from a checkpoint."""
    from conslu.commands.train import run_argv
    from conslu.training import cli as training_cli

    seen: dict = {}

    class Trainer:
        interrupted = False

        def fit(self, model, datamodule=None, ckpt_path=None, weights_only=None):
            seen.update(ckpt_path=ckpt_path, weights_only=weights_only)
            if seen.get("interrupt"):
                self.interrupted = True
                raise SystemExit(1)  # what Lightning does after a graceful Ctrl-C shutdown

    class FakeCLI:
        def __init__(self, *a, **k):
            self.config = {"ckpt_path": None}
            self.trainer, self.model, self.datamodule = Trainer(), None, None

    monkeypatch.setattr(training_cli, "SLUCLI", FakeCLI)
    assert run_argv([]) == 0
    assert seen["weights_only"] is True
    seen["interrupt"] = True
    assert run_argv([]) == 130
    assert "resume with --ckpt_path last" in capsys.readouterr().err


# =============================================================================================
# atomic writes: a failure mid-write leaves the old file intact and no temporary files


def _no_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_grammar_save_interrupted_keeps_old_file(tmp_path, monkeypatch):
    from conslu import grammar as gmod
    from conslu.grammar import Grammar

    path = tmp_path / "g.json"
    shutil.copy(GRAMMAR, path)
    before = path.read_bytes()
    small = Grammar.extract([])
    for target, name in ((os, "replace"), (gmod.json, "dumps")):
        with monkeypatch.context() as mp:
            mp.setattr(target, name, lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
            with pytest.raises(OSError, match="disk full"):
                small.save(path)
        assert path.read_bytes() == before
        assert _no_temps(tmp_path) == []


def test_prediction_side_files_and_manifests_are_atomic(tmp_path, monkeypatch):
    from conslu.data import write_manifest
    from conslu.jsonl import atomic_write_json, atomic_write_jsonl

    side = tmp_path / "pred.jsonl.settings.json"
    atomic_write_json(side, {"beam": 1})
    preds = tmp_path / "pred.jsonl"
    atomic_write_jsonl(preds, [{"id": "a"}])
    manifest = tmp_path / "train.tsv"
    write_manifest(manifest, [])
    olds = {p: p.read_bytes() for p in (side, preds, manifest)}
    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("power cut")))
        for call in (lambda: atomic_write_json(side, {"beam": 4}), lambda: atomic_write_jsonl(preds, [{"id": "b"}]),
                     lambda: write_manifest(manifest, [])):
            with pytest.raises(OSError, match="power cut"):
                call()
    assert {p: p.read_bytes() for p in olds} == olds
    assert _no_temps(tmp_path) == []


def test_model_save_interrupted_keeps_old_folder(tiny_model_dir, tmp_path, monkeypatch):
    from conslu.model import ConSLU

    folder = _copy(tiny_model_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    slu = ConSLU.from_pretrained(folder)
    real = os.replace
    calls = {"n": 0}

    def fail_on_rename_into_place(src, dst, *a, **k):
        calls["n"] += 1
        if Path(dst) == folder and Path(src).name.startswith(".model.tmp"):
            raise OSError("killed while swapping folders")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", fail_on_rename_into_place)
    with pytest.raises(OSError):
        slu.save_pretrained(folder)
    monkeypatch.setattr(os, "replace", real)
    assert folder.is_dir(), "the old model folder is gone"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_export_model_interrupted_keeps_old_folder(tiny_model_dir, tmp_path, monkeypatch):
    from conslu.model import ConSLU
    from conslu.training import export_model

    dest = _copy(tiny_model_dir, tmp_path / "best")
    before = sorted(p.name for p in dest.iterdir())
    slu = ConSLU.from_pretrained(dest)
    real = os.replace

    def fail_second(src, dst, *a, **k):
        if Path(dst) == dest and Path(src).name.startswith(".best.tmp-"):
            raise OSError("killed while swapping folders")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        export_model(slu, dest, {"value": 1.0})
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in dest.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


# =============================================================================================
# safety: weights only as safetensors, no unpickling, no eval of strings


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def _sources() -> list[Path]:
    files = sorted(PKG.rglob("*.py")) + sorted((REPO / "recipes").rglob("*.py"))
    assert len(files) > 20
    return files


def test_no_unsafe_loading_or_eval_in_the_package():
    problems = []
    for f in _sources():
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node, owner, name in _calls(tree):
            where = f"{f.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name == "load" and owner.endswith("torch"):
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("eval", "exec") and not owner:
                problems.append(f"{where}: {name}() of a string")
            if owner.endswith(("pickle", "dill", "cloudpickle", "joblib")) and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner.endswith("yaml") and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or "Safe" not in ast.unparse(loader):
                    problems.append(f"{where}: yaml.{name} without SafeLoader")
            if name == "load" and owner.endswith(("np", "numpy")):
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: numpy.load with allow_pickle")
            if name == "save" and owner.endswith("torch"):
                problems.append(f"{where}: torch.save (weights must be safetensors)")
            if name == "save_pretrained" and "safe_serialization" in kw:
                v = kw["safe_serialization"]
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}: save_pretrained(safe_serialization=...) not True")
    assert problems == []


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")


def test_written_model_folders_hold_safetensors_only(tiny_model_dir, tmp_path):
    import _ct2_writer as w

    from conslu.ct2 import convert_ct2
    from conslu.model import ConSLU
    from conslu.training import export_model

    folders = [tiny_model_dir, export_model(ConSLU.from_pretrained(tiny_model_dir), tmp_path / "exported", {"x": 1})]
    variables, aliases = w.hf_to_ct2(w.tiny_hf_model(d_model=32, heads=2, layers=1), "float32")
    src = w.write_ct2_folder(tmp_path / "ct2", variables, aliases)
    folders.append(convert_ct2(src, tmp_path / "converted"))
    for folder in folders:
        names = [p.name for p in Path(folder).rglob("*") if p.is_file()]
        assert "model.safetensors" in names, (folder, names)
        assert not [n for n in names if n.endswith(WEIGHT_SUFFIXES)], (folder, names)
