"""`conslu evaluate` on a hand-made STOP-layout corpus with a fake model: scores, failures, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parse_fixtures import FakeModel, Stop, strip_timing, write_wav

from conslu.cli import main

GRAMMAR = Path(__file__).resolve().parents[1] / "grammar" / "topv2.json"
HEADER = ["file_id", "domain", "gender", "native", "utterance", "seqlogical", "normalized_utterance",
          "normalized_seqlogical", "decoupled_normalized_seqlogical"]

# (domain, normalized utterance, decoupled logical form)
UTTERANCES = [
    ("weather", "what is the weather", "[IN:GET_WEATHER ]"),
    ("weather", "is it raining in paris", "[IN:GET_WEATHER [SL:WEATHER_ATTRIBUTE raining ] [SL:LOCATION paris ] ]"),
    ("weather", "weather tomorrow", "[IN:GET_WEATHER [SL:DATE_TIME tomorrow ] ]"),
    ("alarm", "set an alarm for seven", "[IN:CREATE_ALARM [SL:DATE_TIME for seven ] ]"),
    ("alarm", "delete my alarm", "[IN:DELETE_ALARM ]"),
    ("alarm", "show my alarms", "[IN:GET_ALARM ]"),
    ("alarm", "snooze", "[IN:SNOOZE_ALARM ]"),
]


def make_corpus(root: Path, split: str = "test", *, empty: int | None = None, quirk: bool = False,
                parts: int = 1, empty_reference: int | None = None) -> list[dict]:
    """A STOP-layout corpus: manifest + one wav per utterance and part, wav i of part p has
    1600 + 160 i + 4000 p samples (row ``empty`` gets an empty file). ``quirk``: manifest file_ids
    name ``<domain>_<split>_<part>`` folders while the audio is in ``<domain>_<split>`` (as in the
    official release). ``parts``: recordings per utterance (``test_0``, ``test_1``, ...; train has
    one). ``empty_reference``: that utterance's decoupled tree is empty in part 0 and ``nan`` in the
    others (as in real releases). Returns the scorable rows with the audio length the fake model
    keys on."""
    rows = []
    lines = ["\t".join(HEADER)]
    for p in range(parts if split != "train" else 1):
        part = "train" if split == "train" else f"{split}_{p}"
        for i, (domain, text, lf) in enumerate(UTTERANCES):
            file_id = f"{part}/{domain}_{split}/{i:08d}.wav"
            path = root / file_id
            if quirk:
                file_id = f"{part}/{domain}_{split}_{p}/{i:08d}.wav" if split != "train" else file_id
            n = 1600 + 160 * i + 4000 * p
            if i == empty:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
            else:
                write_wav(path, n)
            ref = lf if i != empty_reference else ("" if p == 0 else "nan")
            lines.append("\t".join([file_id, domain, "female", "True", text.capitalize() + ".", lf, text,
                                    lf, ref]))
            if i != empty_reference:
                rows.append({"file_id": file_id, "domain": domain, "transcript": text, "logical_form": lf, "n": n})
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "manifests" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def answers(rows: list[dict], wrong: int | None = None) -> dict[int, tuple[str, str]]:
    out = {r["n"]: (r["transcript"], r["logical_form"]) for r in rows}
    if wrong is not None:
        r = rows[wrong]
        out[r["n"]] = (r["transcript"], "[IN:GET_WEATHER ]")  # same intent family, wrong tree for row 2
    return out


@pytest.fixture
def fake(monkeypatch):
    from conslu.grammar import Grammar
    from conslu.model import ConSLU

    grammar = Grammar.load(GRAMMAR)
    holder: dict = {}

    monkeypatch.setattr(ConSLU, "from_pretrained", classmethod(lambda cls, path, *a, **k: holder["model"]))

    def use(model: FakeModel) -> FakeModel:
        model.grammar = grammar
        holder["model"] = model
        return model

    return use


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "my-model"
    d.mkdir(exist_ok=True)
    (d / "conslu.json").write_text("{}")
    (d / "grammar.json").write_bytes(GRAMMAR.read_bytes())  # read when no decoding is needed
    return d


def test_scores_table_and_predictions(fake, tmp_path, capsys, monkeypatch):
    rows = make_corpus(tmp_path / "stop")
    model = fake(FakeModel(answers(rows, wrong=2)))
    monkeypatch.chdir(tmp_path)
    rc = main(["evaluate", "--data", str(tmp_path / "stop"), "--split", "test", "--model", str(_model_dir(tmp_path)),
               "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [c["n"] for c in model.calls] == [3, 3, 1]
    assert model.calls[0]["speculative"] is True and model.calls[0]["constrained"] is None
    # default output: runs/eval/<model name>-<split>-<hash>.jsonl under the current folder
    preds = list((tmp_path / "runs" / "eval").glob("my-model-test-*.jsonl"))
    assert len(preds) == 1
    lines = strip_timing(preds[0])
    assert len(lines) == 7
    assert set(lines[0]) == {"id", "file", "domain", "transcript", "logical_form", "valid"}
    assert [ln["domain"] for ln in lines] == [r["domain"] for r in rows]
    table = out.splitlines()
    all_row = next(ln for ln in table if ln.startswith("all"))
    assert all_row.split()[1:3] == ["7", f"{600 / 7:.2f}"]  # 6 of 7 exact
    weather = next(ln for ln in table if ln.startswith("weather"))
    assert weather.split()[1:3] == ["3", "66.67"]


def test_json_has_score_keys(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop")
    fake(FakeModel(answers(rows, wrong=2)))
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(tmp_path / "stop"), "--model", str(_model_dir(tmp_path)), "--json",
               "--out", str(out_file), "--domains", "weather"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert {"n", "em", "em_tree", "validity", "wer", "per_domain", "missing"} <= set(res)
    assert res["n"] == 3 and res["em"] == pytest.approx(2 / 3) and res["wer"] == 0.0
    assert set(res["per_domain"]) == {"weather"}
    assert res["missing"]["count"] == 0 and res["failed"] == 0
    assert res["predictions"] == str(out_file)


def test_bad_audio_counts_as_failed_and_run_goes_on(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop", empty=4)
    (tmp_path / "stop" / rows[5]["file_id"]).unlink()  # and one missing file
    model = fake(FakeModel(answers(rows)))
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(tmp_path / "stop"), "--model", str(_model_dir(tmp_path)), "--json",
               "--out", str(out_file), "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    res = json.loads(out)
    assert res["n"] == 7 and res["em"] == pytest.approx(5 / 7)
    assert res["missing"]["count"] == 2 and res["failed"] == 2
    assert sum(c["n"] for c in model.calls) == 5
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert sum(rows[4]["file_id"].split("/")[-1] in ln for ln in lines if "no prediction" not in ln) == 1
    assert sum(rows[5]["file_id"].split("/")[-1] in ln for ln in lines if "no prediction" not in ln) == 1
    assert lines[-1] == "conslu: 2 of 7 utterances failed"
    assert len(strip_timing(out_file)) == 5


def test_resume_after_stop_equals_uninterrupted_run(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop")
    model_dir = _model_dir(tmp_path)
    ref = tmp_path / "ref.jsonl"
    fake(FakeModel(answers(rows)))
    base = ["evaluate", "--data", str(tmp_path / "stop"), "--model", str(model_dir), "--batch-size", "2", "--json"]
    assert main([*base, "--out", str(ref)]) == 0
    expected = strip_timing(ref)
    first = json.loads(capsys.readouterr().out)

    out_file = tmp_path / "pred.jsonl"
    fake(FakeModel(answers(rows), stop_after=2))
    with pytest.raises(Stop):
        main([*base, "--out", str(out_file)])
    assert strip_timing(out_file) == expected[:4]
    with open(out_file, "a", encoding="utf-8") as f:
        f.write('{"id": "half a li')
    model = fake(FakeModel(answers(rows)))
    assert main([*base, "--out", str(out_file)]) == 0
    out, err = capsys.readouterr()
    assert "4 of 7 predictions already there" in err
    assert sum(c["n"] for c in model.calls) == 3
    assert strip_timing(out_file) == expected
    again = json.loads(out)
    assert {k: again[k] for k in ("n", "em", "em_tree", "validity", "wer")} == \
        {k: first[k] for k in ("n", "em", "em_tree", "validity", "wer")}
    # complete file: scored without loading the model
    fake(FakeModel(answers(rows), fail_on_call=1))
    assert main([*base, "--out", str(out_file)]) == 0
    assert strip_timing(out_file) == expected


def test_limit_reuses_and_other_data_is_refused(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop")
    make_corpus(tmp_path / "other")
    model_dir = _model_dir(tmp_path)
    out_file = tmp_path / "pred.jsonl"
    fake(FakeModel(answers(rows)))
    assert main(["evaluate", "--data", str(tmp_path / "stop"), "--model", str(model_dir), "--out", str(out_file),
                 "--limit", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    model = fake(FakeModel(answers(rows)))
    assert main(["evaluate", "--data", str(tmp_path / "stop"), "--model", str(model_dir), "--out", str(out_file),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["em"] == 1.0
    assert sum(c["n"] for c in model.calls) == 4
    assert main(["evaluate", "--data", str(tmp_path / "other"), "--model", str(model_dir), "--out", str(out_file)]) == 2
    assert "made with other settings (data:" in capsys.readouterr().err


def test_bad_data_is_one_line(fake, tmp_path, capsys):
    fake(FakeModel())
    rc = main(["evaluate", "--data", str(tmp_path / "nowhere"), "--model", str(_model_dir(tmp_path)),
               "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "nowhere" in err and "Traceback" not in err


def test_official_folder_quirk_is_resolved(fake, tmp_path, capsys):
    rows = make_corpus(tmp_path / "stop", quirk=True)
    fake(FakeModel(answers(rows)))
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(tmp_path / "stop"), "--model", str(_model_dir(tmp_path)), "--json",
               "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["em"] == 1.0
    files = [r["file"] for r in strip_timing(out_file)]
    assert all("_test/" in f and "_test_0/" not in f and Path(f).is_file() for f in files)


def test_two_parts_quirk_and_empty_references_evaluate_end_to_end(fake, tmp_path, capsys):
    """A STOP-shaped test split: two recordings per utterance in test_0 and test_1, both stored with the
    folder quirk, and an utterance whose reference is empty in one part and nan in the other."""
    rows = make_corpus(tmp_path / "stop", quirk=True, parts=2, empty_reference=3)
    model = fake(FakeModel(answers(rows)))
    out_file = tmp_path / "pred.jsonl"
    rc = main(["evaluate", "--data", str(tmp_path / "stop"), "--split", "test", "--model", str(_model_dir(tmp_path)),
               "--json", "--out", str(out_file)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == 12 and res["em"] == 1.0 and res["failed"] == 0      # every recording of both parts
    assert {d: r["n"] for d, r in res["per_domain"].items()} == {"alarm": 6, "weather": 6}
    assert sum(c["n"] for c in model.calls) == 12
    assert len(res["notes"]) == 1 and "2 row(s) with an empty reference skipped" in res["notes"][0]
    assert "test_0/alarm_test_0/00000003.wav, test_1/alarm_test_1/00000003.wav" in res["notes"][0]
    assert "empty reference" in err and "Traceback" not in err
    files = [r["file"] for r in strip_timing(out_file)]
    assert sum("/test_1/alarm_test/" in f for f in files) == 3 and all(Path(f).is_file() for f in files)


def test_sharded_evaluate_equals_one_process(tmp_path, capsys):
    """`--devices 2` (two CPU processes, spawned) writes exactly the one-process predictions, in the
    same order; a killed sharded run's part files are gathered by the next run."""
    from slu_fixtures import tiny_conslu

    rows = make_corpus(tmp_path / "stop", quirk=True, parts=2, empty_reference=3)
    model_dir = tmp_path / "tiny-model"
    tiny_conslu(0).save_pretrained(model_dir)
    base = ["evaluate", "--data", str(tmp_path / "stop"), "--model", str(model_dir), "--batch-size", "3",
            "--max-new-tokens", "24", "--device", "cpu", "--json"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main([*base, "--out", str(one)]) == 0
    first = json.loads(capsys.readouterr().out)
    workers = tmp_path / "workers.jsonl"    # audio and log-mels in two DataLoader processes
    assert main([*base, "--workers", "2", "--out", str(workers)]) == 0
    capsys.readouterr()
    assert strip_timing(workers) == strip_timing(one)
    base_sharded = [a for a in base if a not in ("--device", "cpu")] + ["--accelerator", "cpu"]
    assert main([*base_sharded, "--devices", "2", "--out", str(two)]) == 0
    out, err = capsys.readouterr()
    assert "12 items in 4 batches over 2 processes (cpu, cpu)" in err
    assert strip_timing(two) == strip_timing(one) and len(strip_timing(one)) == len(rows) == 12
    second = json.loads(out)
    assert {k: second[k] for k in ("n", "em", "em_tree", "validity", "wer")} == \
        {k: first[k] for k in ("n", "em", "em_tree", "validity", "wer")}
    assert not list(tmp_path.glob(".two.jsonl.part*"))
    # a killed sharded run: predictions left in part files, none in the output yet
    lines = two.read_text().splitlines(keepends=True)
    two.write_text("")
    (tmp_path / ".two.jsonl.part0").write_text("".join(lines[0:3] + lines[6:9]))
    (tmp_path / ".two.jsonl.part1").write_text("".join(lines[3:5]) + lines[5][:10])   # a cut-off last line
    assert main([*base, "--out", str(two)]) == 0
    err = capsys.readouterr().err
    assert "gathered 8 predictions left by an interrupted sharded run" in err
    assert [r["id"] for r in strip_timing(two)][:8] == [json.loads(x)["id"] for x in lines[:5] + lines[6:9]]
    assert sorted(map(json.dumps, strip_timing(two))) == sorted(map(json.dumps, strip_timing(one)))
    assert main([*base_sharded, "--devices", "0", "--out", str(two)]) == 2
    assert main([*base, "--devices", "2", "--out", str(two)]) == 2   # --device with --devices
    assert "--devices N use --accelerator" in capsys.readouterr().err
