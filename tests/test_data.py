"""Readers (STOP layouts made in tmp_path, shared TOPv2 files) and the STOP manifest writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from conslu.data import (COLUMNS, STOP_COLUMNS, DataError, read_any, read_stop, read_topv2,
                         stop_row, write_manifest)
from conftest import TOPV2_SAMPLE

TREE = "[IN:CREATE_ALARM Set the alarm [SL:DATE_TIME for 7 : 30 tonight ] . ]"


def _row(file_id: str, domain: str = "alarm", utt: str = "Set the alarm for 7:30 tonight.",
         tree: str = TREE) -> dict:
    return stop_row(file_id, domain, "female", "yes", utt, tree)


def _stop(tmp_path: Path, rows_by_split: dict[str, list[dict]], audio: bool = True) -> Path:
    root = tmp_path / "stop"
    for split, rows in rows_by_split.items():
        write_manifest(root / "manifests" / f"{split}.tsv", rows)
        if audio:
            for r in rows:
                p = root / r["file_id"].replace(f"_{split}_0/", f"_{split}/")
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"RIFF")
    return root


def test_stop_row_columns() -> None:
    r = _row("train/alarm_train/00000001.wav")
    assert list(r) == STOP_COLUMNS
    assert r["normalized_utterance"] == "set the alarm for seven thirty tonight"
    assert r["normalized_seqlogical"] == "[IN:CREATE_ALARM set the alarm [SL:DATE_TIME for seven thirty tonight ] ]"
    assert r["decoupled_normalized_seqlogical"] == "[IN:CREATE_ALARM [SL:DATE_TIME for seven thirty tonight ] ]"


def test_write_manifest_is_atomic_and_rejects_tabs(tmp_path: Path) -> None:
    path = tmp_path / "m" / "train.tsv"
    write_manifest(path, [_row("a.wav")])
    before = path.read_text()
    assert before.splitlines()[0].split("\t") == STOP_COLUMNS
    bad = dict(_row("b.wav"), utterance="has\ta tab")
    with pytest.raises(ValueError, match="row 2 .*utterance"):
        write_manifest(path, [_row("a.wav"), bad])
    assert path.read_text() == before                  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["train.tsv"]   # no temp file left


def test_read_stop_layout_with_part_quirk(tmp_path: Path) -> None:
    root = _stop(tmp_path, {
        "train": [_row("train/alarm_train/00000001.wav"),
                  _row("train/weather_train/00000002.wav", "weather", "Is it hot?",
                       "[IN:GET_WEATHER Is it [SL:WEATHER_ATTRIBUTE hot ] ? ]")],
        "eval": [_row("eval_0/alarm_eval_0/00000003.wav")],
    })
    ds = read_stop(root)
    assert ds.column_names == COLUMNS
    assert ds["id"] == ["train/alarm_train/00000001.wav", "train/weather_train/00000002.wav",
                        "eval_0/alarm_eval_0/00000003.wav"]
    assert ds["split"] == ["train", "train", "eval"]
    ev = ds[2]
    assert ev["audio"] == str((root / "eval_0/alarm_eval/00000003.wav").resolve())
    assert ev["transcript"] == "set the alarm for seven thirty tonight"
    assert ev["logical_form"] == "[IN:CREATE_ALARM [SL:DATE_TIME for seven thirty tonight ] ]"
    assert ev["gender"] == "female" and ev["native"] == "yes"
    # split, domain and limit filters; a single manifest file
    assert read_stop(root, "train", domains=["weather"])["id"] == ["train/weather_train/00000002.wav"]
    assert len(read_stop(root, "train", limit=1)) == 1
    one = read_stop(root / "manifests" / "eval.tsv")
    assert one["split"] == ["eval"] and one["audio"] == [ev["audio"]]
    # the path as given wins over the variant when it exists
    given = root / "eval_0/alarm_eval_0/00000003.wav"
    given.parent.mkdir(parents=True)
    given.write_bytes(b"RIFF")
    assert read_stop(root, "eval")["audio"] == [str(given.resolve())]


def test_read_stop_missing_audio(tmp_path: Path) -> None:
    root = _stop(tmp_path, {"test": [_row("test_0/alarm_test_0/1.wav")]}, audio=False)
    (root / "test_0").mkdir()
    with pytest.raises(DataError, match=r"test\.tsv:2: audio file not found: .*alarm_test_0/1\.wav or .*alarm_test/1\.wav"):
        read_stop(root, "test")
    skipped: list[str] = []
    assert len(read_stop(root, "test", skip_bad=True, skipped=skipped)) == 0
    assert len(skipped) == 1 and "1.wav" in skipped[0]
    ds = read_stop(root, "test", check_audio=False)
    assert ds["audio"] == [str((root / "test_0/alarm_test_0/1.wav").resolve())]


def _write_raw(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(r: dict) -> str:
    return "\t".join(r[c] for c in STOP_COLUMNS)


def test_read_stop_bad_rows(tmp_path: Path) -> None:
    good = _row("train/a/1.wav")
    short = "\t".join(list(good.values())[:7])
    broken = dict(_row("train/a/3.wav"), decoupled_normalized_seqlogical="[IN:X [SL:Y a ]")
    dup = _row("train/a/1.wav")
    m = _write_raw(tmp_path / "stop" / "manifests" / "train.tsv",
                   ["\t".join(STOP_COLUMNS), _line(good), short, _line(broken), _line(dup)])
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 9 fields, got 7"):
        read_stop(m, check_audio=False)
    skipped: list[str] = []
    ds = read_stop(m, check_audio=False, skip_bad=True, skipped=skipped)
    assert ds["id"] == ["train/a/1.wav"]
    assert skipped[0].endswith("train.tsv:3: expected 9 fields, got 7")
    assert "train.tsv:4: decoupled_normalized_seqlogical: malformed tree at char" in skipped[1]
    assert "train.tsv:5: duplicated id 'train/a/1.wav' (first at" in skipped[2]
    m2 = _write_raw(tmp_path / "m2" / "train.tsv", ["\t".join(STOP_COLUMNS), _line(good), _line(broken)])
    with pytest.raises(DataError, match=r"train\.tsv:3: .*malformed tree at char \d+"):
        read_stop(m2, check_audio=False)
    m3 = _write_raw(tmp_path / "m3" / "train.tsv", ["\t".join(STOP_COLUMNS), _line(good), _line(dup)])
    with pytest.raises(DataError, match="duplicated id"):
        read_stop(m3, check_audio=False)


def test_read_stop_missing_columns(tmp_path: Path) -> None:
    cols = [c for c in STOP_COLUMNS if c not in ("normalized_utterance", "seqlogical")]
    m = _write_raw(tmp_path / "manifests" / "eval.tsv", ["\t".join(cols)])
    with pytest.raises(DataError, match="missing column.*normalized_utterance"):
        read_stop(m, check_audio=False)
    # without the normalised columns, utterance + seqlogical are normalised by the reader
    cols = ["file_id", "domain", "utterance", "seqlogical"]
    m = _write_raw(tmp_path / "m4" / "eval.tsv", ["\t".join(cols), "x.wav\talarm\tWake me at 7am.\t"
                                                  "[IN:CREATE_ALARM Wake me [SL:DATE_TIME at 7 am ] . ]"])
    row = read_stop(m, check_audio=False)[0]
    assert row["transcript"] == "wake me at seven am"
    assert row["logical_form"] == "[IN:CREATE_ALARM [SL:DATE_TIME at seven am ] ]"
    assert row["gender"] is None


def test_read_stop_not_a_release(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifests"):
        read_stop(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_stop(tmp_path / "nope")


def test_read_topv2_sample_files() -> None:
    ds = read_topv2(sorted(TOPV2_SAMPLE.glob("*.tsv")))
    assert ds.column_names == COLUMNS
    assert sorted(set(ds["split"])) == ["eval", "train"] and len(ds) > 600
    assert all(t and lf.startswith("[IN:") for t, lf in zip(ds["transcript"], ds["logical_form"]))


def test_read_topv2_full_release(topv2_full: Path) -> None:
    TOPV2_DIR = topv2_full
    files = sorted(TOPV2_DIR.glob("*.tsv"))
    ds = read_topv2(files, limit=50)
    assert ds.column_names == COLUMNS
    assert sorted(set(ds["split"])) == ["eval", "train"]
    assert len(ds) == 100                         # limit is per split
    first = ds[ds["id"].index("alarm_train_2")]
    assert first["audio"] is None and first["split"] == "train" and first["domain"] == "alarm"
    assert first["transcript"] == "set the alarm for tonight"
    assert first["logical_form"] == "[IN:CREATE_ALARM [SL:DATE_TIME for tonight ] ]"
    w = read_topv2([TOPV2_DIR / "weather_eval.tsv", TOPV2_DIR / "timer_train.tsv"],
                   splits=["eval"], domains=["weather"], limit=20)
    assert len(w) == 20 and set(w["domain"]) == {"weather"} and set(w["split"]) == {"eval"}
    assert all(i.startswith("weather_eval_") for i in w["id"])
    both = read_any([TOPV2_DIR / "alarm_eval.tsv"], limit=5)
    assert both["id"] == ["alarm_eval_2", "alarm_eval_3", "alarm_eval_4", "alarm_eval_5", "alarm_eval_6"]


def test_read_topv2_errors(tmp_path: Path) -> None:
    f = _write_raw(tmp_path / "alarm_train.tsv", [
        "domain\tutterance\tsemantic_parse",
        "alarm\twake me at 7am\t[IN:CREATE_ALARM wake me [SL:DATE_TIME at 7 am ] ]",
        "alarm\tbroken",
        "alarm\tbad tree\t[IN:X bad tree",
    ])
    with pytest.raises(DataError, match=r"alarm_train\.tsv:3: expected 3 fields, got 2"):
        read_topv2([f])
    skipped: list[str] = []
    ds = read_topv2([f], skip_bad=True, skipped=skipped)
    assert ds["id"] == ["alarm_train_2"] and ds["transcript"] == ["wake me at seven am"]
    assert "alarm_train.tsv:4: semantic_parse: malformed tree at char" in skipped[1]
    clean = _write_raw(tmp_path / "timer_eval.tsv", [
        "domain\tutterance\tsemantic_parse", "timer\tpause\t[IN:PAUSE_TIMER pause ]"])
    with pytest.raises(DataError, match=r"timer_eval\.tsv:2: duplicated id 'timer_eval_2' \(first at .*:2\)"):
        read_topv2([clean, clean])
    assert len(read_topv2([clean, clean], skip_bad=True)) == 1
    g = _write_raw(tmp_path / "notes.tsv", ["domain\tutterance\tsemantic_parse"])
    with pytest.raises(DataError, match="cannot tell the split"):
        read_topv2([g])
    h = _write_raw(tmp_path / "x_eval.tsv", ["domain\ttext"])
    with pytest.raises(DataError, match="missing column.*utterance, semantic_parse"):
        read_topv2([h])


def test_read_any_mixes_sources(tmp_path: Path) -> None:
    root = _stop(tmp_path, {"eval": [_row("eval_0/alarm_eval_0/1.wav")]})
    topv2 = _write_raw(tmp_path / "alarm_eval.tsv", [
        "domain\tutterance\tsemantic_parse",
        "alarm\tsnooze\t[IN:SNOOZE_ALARM snooze ]",
    ])
    ds = read_any([root, topv2, root / "manifests" / "eval.tsv"], skip_bad=True)
    assert ds["id"] == ["eval_0/alarm_eval_0/1.wav", "alarm_eval_2"]
    with pytest.raises(DataError, match="duplicated id"):
        read_any([root, root])
    assert len(read_any([root, topv2], splits=["train"])) == 0


def _two_parts(tmp_path: Path, *, part1: bool = True) -> Path:
    """A STOP-shaped test split: two recordings per utterance (test_0, test_1), each stored with the
    release's folder quirk, plus a row whose decoupled reference is empty and one holding ``nan``."""
    rows = []
    for part in (0, 1):
        rows += [_row(f"test_{part}/alarm_test_{part}/0000000{i}.wav") for i in (1, 2)]
    empty = dict(_row("test_0/alarm_test_0/00000003.wav"), decoupled_normalized_seqlogical="")
    nan = dict(_row("test_1/alarm_test_1/00000003.wav"), decoupled_normalized_seqlogical="nan")
    root = tmp_path / "stop"
    m = _write_raw(root / "manifests" / "test.tsv", ["\t".join(STOP_COLUMNS)] + [_line(r) for r in [*rows, empty, nan]])
    for r in rows:
        part = r["file_id"].split("/")[0]
        if part == "test_1" and not part1:
            continue
        p = root / r["file_id"].replace(f"_test_{part[-1]}/", "_test/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"RIFF")
    assert m.is_file()
    return root


def test_read_stop_both_parts_quirk_and_empty_references(tmp_path: Path) -> None:
    root = _two_parts(tmp_path)
    notes: list[str] = []
    ds = read_stop(root, "test", notes=notes)
    assert ds["id"] == [f"test_{p}/alarm_test_{p}/0000000{i}.wav" for p in (0, 1) for i in (1, 2)]
    assert ds["audio"][2] == str((root / "test_1/alarm_test/00000001.wav").resolve())   # quirk, part 1
    assert len(notes) == 1
    assert "test.tsv: 2 row(s) with an empty reference skipped" in notes[0]
    assert "test_0/alarm_test_0/00000003.wav, test_1/alarm_test_1/00000003.wav" in notes[0]


def test_read_stop_missing_part_is_one_clear_error(tmp_path: Path) -> None:
    root = _two_parts(tmp_path, part1=False)
    with pytest.raises(DataError, match=r"stop/test_1: recording part folder not found \(.*test\.tsv:4 and every "
                                        r"other row of part 'test_1'"):
        read_stop(root, "test")
    notes: list[str] = []
    ds = read_stop(root, "test", skip_bad=True, notes=notes)          # training with skip_bad: part 0 only
    assert [i.split("/")[0] for i in ds["id"]] == ["test_0", "test_0"]
    assert any("test_1: recording part folder not found (2 row(s) refer to it)" in n for n in notes)
    notes = []
    ds = read_stop(root, "test", check_audio=False, notes=notes)      # evaluate: the rows stay, the part is said
    assert len(ds) == 4 and any("test_1: recording part folder not found" in n for n in notes)
