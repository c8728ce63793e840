"""recipes/ablation/run.py: report formatting and text subsets (fast), --smoke end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOPV2 = Path(os.environ.get("CONSLU_TOPV2_DIR", REPO.parent / "shared" / "data" / "topv2"))


def _load():
    spec = importlib.util.spec_from_file_location("ablation_run", REPO / "recipes" / "ablation" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["ablation_run"] = mod
    spec.loader.exec_module(mod)
    return mod


run = _load()
KEYS = {"em", "em_tree", "validity", "wer", "n", "train_steps", "train_seconds", "machine"}


def _variant(em: float) -> dict:
    return {"em": em, "em_tree": 0.5, "validity": 1.0, "wer": 0.1, "n": 30, "train_steps": 300,
            "train_seconds": 901.4, "machine": {}}


def test_markdown_table_has_every_variant_and_the_paper_figures() -> None:
    report = {"config": {"n_train": 1200, "n_eval": 300, "domains": ["alarm", "timer"]},
              "variants": {"conslu": _variant(0.6), "whislu": _variant(0.25)},
              "machine": {"platform": "Linux", "cpu_count": 2, "torch": "2.x"}}
    md = run.format_markdown(report)
    rows = [ln for ln in md.splitlines() if ln.startswith("| (")]
    assert len(rows) == len(run.VARIANTS) == 6
    conslu = next(r for r in rows if r.startswith("| (1) ")).split("|")
    assert [c.strip() for c in conslu[2:9]] == ["60.00", "50.00", "100.00", "10.00", "30", "300", "901"]
    assert conslu[9].strip() == "72.51" and conslu[10].strip() == "100.00"
    whislu = next(r for r in rows if r.startswith("| (4)")).split("|")
    assert whislu[2].strip() == "25.00" and whislu[9].strip() == "70.19" and whislu[10].strip() == "99.59"
    assert "(not run)" in next(r for r in rows if r.startswith("| (2) "))
    assert "71.17" in md and "1200 espeak-ng utterances" in md and "SMOKE" not in md
    assert all(r.count("|") == 11 for r in rows)


def test_variants_cover_the_paper_ablation() -> None:
    assert run.VARIANTS["conslu"][:2] == ("conslu", True)
    assert run.VARIANTS["plain_loss"][:2] == ("plain", True)
    assert run.VARIANTS["no_constraints"][:2] == ("plain", False)  # (2) and (3) share one trained model
    assert run.VARIANTS["whislu"][:2] == ("whislu", False)
    assert [v[2] for v in run.VARIANTS.values()] == [1, 4, 1, 4, 1, 1]  # beam 4 for (1b) and (2b)
    assert run.VARIANTS["conslu_beam4"][:2] == run.VARIANTS["conslu"][:2]
    for name, (overlay, _) in run.MODELS.items():
        assert overlay is None or overlay.is_file(), name


def test_reports_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    report = {"key": "k", "variants": {"conslu": _variant(0.5)}, "config": {}}
    run.save_report(tmp_path, report)
    assert run.load_report(tmp_path / "ablation.json") == report
    assert (tmp_path / "ablation.md").read_text().startswith("Whisper tiny.en")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.json", "ablation.md"]
    (tmp_path / "ablation.json").write_text("{broken")
    with pytest.raises(ValueError, match="ablation.json"):
        run.load_report(tmp_path / "ablation.json")


def test_spread_and_subsets(tmp_path: Path) -> None:
    assert run.spread(10, 3) == [0, 3, 6] and run.spread(3, 10) == [0, 1, 2] and run.spread(5, None) == list(range(5))
    src = tmp_path / "topv2"
    src.mkdir()
    for split in ("train", "eval"):
        rows = [f"alarm\tset alarm {i}\t[IN:CREATE_ALARM set alarm {i} ]" for i in range(6)]
        (src / f"alarm_{split}.tsv").write_text("domain\tutterance\tsemantic_parse\n" + "\n".join(rows) + "\n")
    files = run.write_subsets(src, ["alarm"], {"train": 3, "eval": 2}, tmp_path / "text")
    lines = {f.name: f.read_text().splitlines() for f in files}
    assert lines["alarm_train.tsv"][0].startswith("domain") and len(lines["alarm_train.tsv"]) == 4
    assert lines["alarm_eval.tsv"][1:] == [f"alarm\tset alarm {i}\t[IN:CREATE_ALARM set alarm {i} ]" for i in (0, 3)]
    with pytest.raises(FileNotFoundError, match="music_train.tsv"):
        run.write_subsets(src, ["music"], {"train": 1}, tmp_path / "text")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--train-per-domain", "0"])


def test_config_and_overlays_parse_as_training_configs() -> None:
    from conslu.commands.train import run_argv

    for overlay in [None, *(o for o, _ in run.MODELS.values() if o is not None)]:
        extra = ["--config", str(overlay)] if overlay else []
        assert run_argv(["--config", str(run.CONFIG), *extra, "--print_config"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None or not (TOPV2 / "alarm_train.tsv").is_file(),
                    reason="needs espeak-ng and the TOPv2 text")
def test_smoke_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--smoke", "--out", str(out), "--work", str(work), "--topv2", str(TOPV2)]
    assert run.main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["variants"]) == set(run.VARIANTS)
    for name, v in report["variants"].items():
        assert KEYS <= set(v), name
        assert v["n"] == 4 and v["train_steps"] == run.SMOKE["max_steps"]
        assert {"platform", "cpu_count", "torch"} <= set(v["machine"])
    for name in ("conslu", "conslu_beam4", "plain_loss", "plain_loss_beam4"):
        assert report["variants"][name]["validity"] == 1.0  # constrained decoding: always a valid tree
    assert report["variants"]["conslu_beam4"]["beam_size"] == 4 and report["variants"]["conslu"]["beam_size"] == 1
    # (2) and (3) come from one trained model
    assert report["training"].keys() == {"conslu", "plain", "whislu"}
    md = (out / "ablation.md").read_text()
    assert md.count("| (") == len(run.VARIANTS) == 6 and "72.51" in md and "SMOKE RUN" in md
    # EM against training steps: a point every step (--smoke: --curve-every 1) for each greedy variant
    curves = report["curves"]
    assert set(curves) == {"conslu", "plain_loss", "no_constraints", "whislu"}
    for points in curves.values():
        assert [p["step"] for p in points] == list(range(1, run.SMOKE["max_steps"] + 1))
        assert all(0.0 <= p["em"] <= p["em_tree"] <= 1.0 for p in points)
    assert all(p["validity"] == 1.0 for p in curves["conslu"])
    assert curves["conslu"][-1]["em"] == report["variants"]["conslu"]["em"]   # the last point is the model scored
    assert (out / "ablation_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "ablation_curve.png" in md
    capsys.readouterr()

    # rerun: every variant is skipped, nothing retrained
    assert run.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("done already - skipped") == len(run.VARIANTS) and "train conslu" not in err
