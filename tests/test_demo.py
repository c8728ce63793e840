"""conslu demo: table/JSON helpers (fast) and the --quick run end to end (slow: real tiny.en + espeak-ng)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from conslu import demo
from conslu.commands import demo as command


def _score(em: float, valid: float, n: int = 10) -> dict:
    return {"n": n, "em": em, "em_tree": em, "validity": valid, "wer": 0.125, "seconds": 1.5, "utt_per_s": 6.67}


def test_format_results_is_a_markdown_table_in_percent() -> None:
    table = demo.format_results([("constrained", _score(0.5, 1.0)), ("unconstrained", _score(0.25, 0.75))])
    lines = table.splitlines()
    assert lines[0].startswith("| decoding | n | EM |") and lines[1].startswith("|---|")
    assert lines[2] == "| constrained | 10 | 50.00 | 50.00 | 100.00 | 12.50 | 6.67 |"
    assert lines[3].split("|")[3].strip() == "25.00" and lines[3].split("|")[5].strip() == "75.00"
    assert all(line.count("|") == 8 for line in lines)


def test_format_results_marks_missing_figures() -> None:
    assert "| x | - | - | - | - | - | - |" in demo.format_results([("x", {})])


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    demo.atomic_write_text(target, "1")
    demo.atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_machine_info_has_what_timings_need() -> None:
    info = demo.machine_info()
    assert {"platform", "cpu_count", "torch"} <= set(info) and info["cpu_count"] >= 1


def test_demo_text_files_are_embedded() -> None:
    files = demo.demo_text_files()
    assert sorted(f.name for f in files) == sorted(f"{d}_{s}.tsv" for d in ("alarm", "timer", "weather")
                                                   for s in ("train", "eval"))
    assert all(f.read_text().startswith("domain\tutterance\tsemantic_parse") for f in files)


def test_settings_fit_the_budget() -> None:
    # the full demo trains on every embedded utterance for a bounded time; --quick is tiny
    # the full demo trains the whole model on every embedded utterance within a bounded number of steps
    assert demo.FULL.train_limit is None and demo.FULL.batch_size == 8 and demo.FULL.max_steps <= 450
    assert demo.QUICK.max_steps <= 5 and demo.QUICK.train_limit <= 20


def test_sample_sentence_is_not_a_training_transcript() -> None:
    first = demo.SAMPLES[0][0]
    assert demo._pick_sample([{"transcript": "something else"}])[0] == first
    assert demo._pick_sample([{"transcript": first}])[0] == demo.SAMPLES[1][0]
    with pytest.raises(ValueError):
        demo._pick_sample([{"transcript": t} for t, _ in demo.SAMPLES])


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    return p.parse_args(list(argv))


def test_command_module_interface(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert command.NAME == "demo" and command.HELP == "end-to-end CPU demo on embedded data"
    args = _args()
    assert (args.workdir, args.quick, args.seed) == ("runs/demo", False, 0)
    from conslu.data import DataError

    def fail(workdir, settings, seed=0):  # type: ignore[no-untyped-def]
        assert settings is demo.QUICK and workdir == Path("w") / "quick" and seed == 3
        raise DataError("w/corpus/manifests/train.tsv:2: malformed tree")

    monkeypatch.setattr(demo, "run_demo", fail)
    assert command.run(_args("--workdir", "w", "--quick", "--seed", "3")) == 1  # a known input problem: one line
    assert capsys.readouterr().err == "conslu demo: w/corpus/manifests/train.tsv:2: malformed tree\n"
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # bugs keep their traceback
        command.run(_args())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _args("--workdir", str(tmp_path / "demo"), "--quick")
    assert command.run(args) == 0
    out = capsys.readouterr()
    work = tmp_path / "demo" / "quick"
    summary = json.loads((work / "demo.json").read_text())
    assert summary["n_train"] == demo.QUICK.train_limit and summary["n_eval"] == demo.QUICK.eval_limit
    assert summary["train"]["steps"] == demo.QUICK.max_steps
    for name in ("constrained", "unconstrained", "unseen voices, constrained"):
        r = summary["results"][name]
        assert r["n"] == demo.QUICK.eval_limit and 0.0 <= r["em"] <= 1.0 and r["utt_per_s"] > 0
    for name in ("constrained", "constrained, beam 4", "unseen voices, constrained", "unseen voices, beam 4"):
        assert summary["results"][name]["validity"] == 1.0  # constrained decoding is always valid
    assert json.loads((work / "model" / "conslu.json").read_text())["audio_context"] == demo.QUICK.audio_context
    unseen = json.loads((work / "unseen" / ".conslu-synth.json").read_text())
    assert set(unseen["voices"]).isdisjoint(json.loads((work / "corpus" / ".conslu-synth.json").read_text())["voices"])
    assert summary["sample"]["constrained"]["valid"] is True
    from conslu.model import CONFIG_NAME

    assert (work / "model" / CONFIG_NAME).is_file()
    assert (work / "sample.wav").is_file()
    assert "| constrained |" in out.out and "conslu parse" in out.out
    for stage in range(1, 6):
        assert f"[{stage}/5]" in out.err

    # rerun: corpus and model are reused, not rebuilt
    assert command.run(args) == 0
    err = capsys.readouterr().err
    assert "0 wav(s) written" in err and "skipped" in err and "trained with these settings already" in err
