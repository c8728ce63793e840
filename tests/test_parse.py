"""`conslu parse`: batching, error lines, exit codes, resumable --out (fake model); one real tiny model run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parse_fixtures import FakeModel, Stop, strip_timing, write_wav

from conslu.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeModel as what ConSLU.from_pretrained returns; yields a setter for a new one."""
    from conslu.model import ConSLU

    holder = {"model": FakeModel()}

    def from_pretrained(path, *a, **k):
        holder["path"] = path
        return holder["model"]

    monkeypatch.setattr(ConSLU, "from_pretrained", classmethod(lambda cls, path, *a, **k: from_pretrained(path)))

    def use(model: FakeModel) -> FakeModel:
        holder["model"] = model
        return model

    use.holder = holder
    return use


@pytest.fixture
def wavs(tmp_path):
    """Seven short wavs with distinct lengths (the fake model's transcript names the length)."""
    return [str(write_wav(tmp_path / f"a{i}.wav", 1600 + 160 * i)) for i in range(7)]


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_batches_in_order_with_options(fake, wavs, tmp_path, capsys):
    model = fake(FakeModel())
    rc = main(["parse", *wavs, "--model", str(tmp_path), "--batch-size", "3", "--beam", "2",
               "--max-new-tokens", "40", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [c["n"] for c in model.calls] == [3, 3, 1]
    assert all(c["beam"] == 2 and c["max_new_tokens"] == 40 and c["speculative"] is True
               and c["constrained"] is None for c in model.calls)
    rows = _lines(out)
    assert [r["file"] for r in rows] == wavs
    assert [r["transcript"] for r in rows] == [f"n {1600 + 160 * i}" for i in range(7)]
    for r in rows:
        assert set(r) == {"file", "transcript", "logical_form", "valid", "seconds"}
        assert r["logical_form"] == "[IN:GET_WEATHER ]" and r["valid"] is True and r["seconds"] >= 0
    assert model.device == "cpu"
    assert "failed" not in err


def test_unconstrained_and_no_speculative_are_passed(fake, wavs, tmp_path, capsys):
    model = fake(FakeModel())
    assert main(["parse", *wavs[:2], "--model", str(tmp_path), "--unconstrained", "--no-speculative"]) == 0
    assert model.calls == [{"n": 2, "lengths": [1600, 1760], "beam": 1, "constrained": False,
                            "max_new_tokens": None, "speculative": False}]


def test_too_small_length_budget_is_a_usage_error(wavs, tmp_path, capsys):
    """A real (tiny random) ConSLU folder: --max-new-tokens below the shortest closed tree is refused up front."""
    from slu_fixtures import tiny_conslu

    folder = tiny_conslu(0).save_pretrained(tmp_path / "model")
    assert main(["parse", wavs[0], "--model", str(folder), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "at least 5" in err and err.count("\n") == 1


def _bad_inputs(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    folder = tmp_path / "recordings"
    folder.mkdir()
    write_wav(folder / "inside.wav", 1000)
    return {"empty": str(empty), "text": str(text), "missing": str(tmp_path / "missing.wav"), "dir": str(folder)}


def test_bad_files_get_one_line_each_and_the_rest_go_on(fake, wavs, tmp_path, capsys):
    bad = _bad_inputs(tmp_path)
    files = [wavs[0], bad["empty"], bad["text"], wavs[1], bad["missing"], bad["dir"], wavs[2]]
    model = fake(FakeModel())
    rc = main(["parse", *files, "--model", str(tmp_path), "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert [r["file"] for r in _lines(out)] == [wavs[0], wavs[1], wavs[2]]
    assert sum(c["n"] for c in model.calls) == 3
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    for path in bad.values():
        mine = [ln for ln in lines if ln.startswith(f"conslu: {path}: ")]
        assert len(mine) == 1, (path, lines)
    assert "is a directory" in err
    assert lines[-1] == "conslu: 4 of 7 files failed"


def test_debug_prints_tracebacks(fake, wavs, tmp_path, capsys):
    bad = _bad_inputs(tmp_path)
    fake(FakeModel())
    assert main(["parse", bad["text"], wavs[0], "--model", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"conslu: {bad['text']}: " in err


def test_usage_and_model_errors(fake, wavs, tmp_path, capsys, monkeypatch):
    assert main(["parse", wavs[0], "--model", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    from conslu.model import ConSLU, ModelFolderError

    def broken(cls, path, *a, **k):
        raise ModelFolderError(f"{path}: not a ConSLU model folder (no conslu.json)")

    monkeypatch.setattr(ConSLU, "from_pretrained", classmethod(broken))
    assert main(["parse", wavs[0], "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"conslu: {tmp_path / 'nope'}: not a ConSLU model folder (no conslu.json)"


def test_decoding_failure_stops_and_keeps_results(fake, wavs, tmp_path, capsys):
    fake(FakeModel(fail_on_call=2))
    out = tmp_path / "pred.jsonl"
    assert main(["parse", *wavs, "--model", str(tmp_path), "--batch-size", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"decoding failed on the batch starting at {wavs[2]}: RuntimeError: CUDA out of memory" in err
    assert "Traceback" not in err
    assert [r["file"] for r in strip_timing(out)] == wavs[:2]


def test_duplicate_files_are_parsed_once(fake, wavs, tmp_path, capsys):
    fake(FakeModel())
    assert main(["parse", wavs[0], wavs[1], wavs[0], "--model", str(tmp_path)]) == 0
    assert [r["file"] for r in _lines(capsys.readouterr().out)] == wavs[:2]


def test_out_resumes_after_stop_and_truncated_line(fake, wavs, tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    fake(FakeModel())
    assert main(["parse", *wavs, "--model", str(tmp_path), "--batch-size", "2", "--out", str(ref)]) == 0
    assert capsys.readouterr().out == ""  # --out: nothing on stdout
    expected = strip_timing(ref)
    assert len(expected) == 7

    out = tmp_path / "pred.jsonl"
    fake(FakeModel(stop_after=2))
    with pytest.raises(Stop):
        main(["parse", *wavs, "--model", str(tmp_path), "--batch-size", "2", "--out", str(out)])
    assert strip_timing(out) == expected[:4]  # two batches, each line flushed
    # a kill in the middle of writing the next line
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"file": "%s", "transcr' % wavs[4])
    model = fake(FakeModel())
    assert main(["parse", *wavs, "--model", str(tmp_path), "--batch-size", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "dropped an incomplete last line" in err and "4 of 7 files already done" in err
    assert [c["lengths"] for c in model.calls] == [[2240, 2400], [2560]]  # only files 4..6 decoded
    assert strip_timing(out) == expected
    # everything done: the model is not even loaded
    fake(FakeModel(fail_on_call=1))
    assert main(["parse", *wavs, "--model", str(tmp_path), "--out", str(out)]) == 0
    assert strip_timing(out) == expected


def test_out_refuses_results_of_other_settings(fake, wavs, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    fake(FakeModel())
    assert main(["parse", *wavs[:2], "--model", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(Path(str(out) + ".settings.json").read_text())["beam_size"] == 1
    capsys.readouterr()
    assert main(["parse", *wavs, "--model", str(tmp_path), "--out", str(out), "--beam", "4"]) == 2
    err = capsys.readouterr().err
    assert "made with other settings (beam_size: 1 -> 4)" in err
    assert len(strip_timing(out)) == 2


def test_failed_files_are_retried_on_resume(fake, wavs, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    late = tmp_path / "late.wav"
    fake(FakeModel())
    assert main(["parse", wavs[0], str(late), "--model", str(tmp_path), "--out", str(out)]) == 1
    assert "1 of 2 files failed" in capsys.readouterr().err
    write_wav(late, 3000)
    model = fake(FakeModel())
    assert main(["parse", wavs[0], str(late), "--model", str(tmp_path), "--out", str(out)]) == 0
    assert [c["lengths"] for c in model.calls] == [[3000]]
    assert [r["file"] for r in strip_timing(out)] == [wavs[0], str(late)]


def test_sigkill_loses_nothing_written(tmp_path):
    """A real process killed with SIGKILL mid-run: the rerun completes the file without duplicates."""
    wav_paths = [str(write_wav(tmp_path / f"k{i}.wav", 1600 + 16 * i)) for i in range(12)]
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conslu.parse
        from parse_fixtures import FakeModel
        class Slow(FakeModel):
            def parse(self, audios, options=None):
                time.sleep(float(sys.argv[1]))
                return super().parse(audios, options)
        conslu.parse.load_model = lambda *a, **k: Slow()
        from conslu.cli import main
        sys.exit(main(sys.argv[2:]))
    """))
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, str(script)]
    args = ["parse", *wav_paths, "--model", str(tmp_path), "--batch-size", "2", "--out", str(out)]
    proc = subprocess.Popen([*cmd, "0.4", *args], stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = out.read_text().count("\n")
    assert 3 <= n_before < 12
    done = subprocess.run([*cmd, "0", *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    rows = strip_timing(out)
    assert [r["file"] for r in rows] == wav_paths
    assert [r["transcript"] for r in rows] == [f"n {1600 + 16 * i}" for i in range(12)]


# ---------------------------------------------------------------------------------------------
# The real thing: a tiny random ConSLU folder on espeak-ng speech


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_real_tiny_model_on_speech(tmp_path, capsys):
    from slu_fixtures import tiny_conslu

    model_dir = tmp_path / "model"
    tiny_conslu().save_pretrained(model_dir)
    good = []
    for i, text in enumerate(["set an alarm for seven", "what is the weather"]):
        p = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "130", "-w", str(p), text], check=True, capture_output=True)
        good.append(str(p))
    bad = _bad_inputs(tmp_path)
    out = tmp_path / "pred.jsonl"
    rc = main(["parse", good[0], bad["empty"], bad["text"], bad["missing"], bad["dir"], good[1],
               "--model", str(model_dir), "--max-new-tokens", "12", "--batch-size", "2", "--out", str(out),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert "decoding failed" not in err, err
    assert rc == 1, err
    assert err.strip().splitlines()[-1] == "conslu: 4 of 6 files failed"
    rows = strip_timing(out)
    assert [r["file"] for r in rows] == good
    from conslu.grammar import Grammar

    g = Grammar.load(model_dir / "grammar.json")
    for r in rows:
        assert isinstance(r["transcript"], str) and isinstance(r["logical_form"], str)
        assert r["valid"] == (bool(r["logical_form"]) and g.is_valid(r["logical_form"]))
    # copy-speculative greedy decoding is exact: plain batched greedy decoding gives the same output
    assert main(["parse", *good, "--model", str(model_dir), "--max-new-tokens", "12", "--no-speculative"]) == 0
    again = _lines(capsys.readouterr().out)
    assert [(r["file"], r["transcript"], r["logical_form"], r["valid"]) for r in again] == \
        [(r["file"], r["transcript"], r["logical_form"], r["valid"]) for r in rows]
