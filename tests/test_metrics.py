"""Tests for conslu.metrics: EM, EM-tree, validity, WER, missing/ignored ids, per-domain, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conslu.cli import main
from conslu.grammar import Grammar
from conslu.metrics import ScoreError, read_jsonl, score, score_one, word_errors

REFS = [
    {"id": 1, "transcript": "please pause the song", "logical_form": "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]", "domain": "music"},
    {"id": 2, "transcript": "set an alarm for seven", "logical_form": "[IN:CREATE_ALARM [SL:DATE_TIME for seven ] ]", "domain": "alarm"},
    {"id": 3, "transcript": "wake me up", "logical_form": "[IN:CREATE_ALARM ]", "domain": "alarm"},
    {"id": 4, "transcript": "is it raining", "logical_form": "[IN:GET_WEATHER [SL:WEATHER_ATTRIBUTE raining ] ]"},
]
HYPS = [
    # EM (case and spacing differ), EM-tree, valid; WER 0
    {"id": 1, "transcript": "Please pause  the song", "logical_form": "[IN:PAUSE_MUSIC  [SL:MUSIC_TYPE SONG ] ]"},
    # slot words differ: EM-tree only; valid; one deletion
    {"id": "2", "transcript": "set alarm for seven", "logical_form": "[IN:CREATE_ALARM [SL:DATE_TIME for six ] ]"},
    # id 3 missing: 3 deletions
    # wrong slot: well-formed, not in the grammar; one insertion
    {"id": 4, "transcript": "is it raining today", "logical_form": "[IN:GET_WEATHER [SL:MUSIC_TYPE raining ] ]"},
    {"id": "zz", "transcript": "extra", "logical_form": "[IN:X ]"},
]
GRAMMAR = Grammar.extract(r["logical_form"] for r in REFS)


def _approx(d: dict) -> dict:
    return {k: pytest.approx(v) for k, v in d.items()}


def test_score_without_grammar() -> None:
    r = score(REFS, HYPS)
    assert {k: r[k] for k in ("n", "em", "em_tree", "validity", "wer")} == _approx(
        {"n": 4, "em": 1 / 4, "em_tree": 2 / 4, "validity": 3 / 4, "wer": 5 / 15})
    assert (r["word_errors"], r["ref_words"]) == (5, 15)
    assert r["missing"] == {"count": 1, "ids": ["3"]}
    assert r["ignored"] == {"count": 1, "ids": ["zz"]}
    assert list(r["per_domain"]) == ["alarm", "music", "unknown"]
    pd = r["per_domain"]
    assert {k: pd["music"][k] for k in ("n", "em", "em_tree", "validity", "wer")} == {
        "n": 1, "em": 1.0, "em_tree": 1.0, "validity": 1.0, "wer": 0.0}
    assert {k: pd["alarm"][k] for k in ("n", "em", "em_tree", "validity", "wer")} == _approx(
        {"n": 2, "em": 0.0, "em_tree": 0.5, "validity": 0.5, "wer": 4 / 8})
    assert {k: pd["unknown"][k] for k in ("n", "em", "em_tree", "validity", "wer")} == _approx(
        {"n": 1, "em": 0.0, "em_tree": 0.0, "validity": 1.0, "wer": 1 / 3})


def test_score_with_grammar() -> None:
    r = score(REFS, HYPS, GRAMMAR)
    assert r["validity"] == pytest.approx(2 / 4)
    assert r["per_domain"]["unknown"]["validity"] == 0.0
    assert r["em"] == pytest.approx(1 / 4)  # EM does not depend on the grammar


def test_score_one_cases() -> None:
    ref = "[IN:A [SL:B x y ] ]"
    assert score_one(ref, "[IN:A [SL:B x y ] ]") == {"em": True, "em_tree": True, "valid": True}
    assert score_one(ref, "[IN:A [SL:B x ] ]") == {"em": False, "em_tree": True, "valid": True}
    assert score_one(ref, "[IN:A [SL:C x y ] ]") == {"em": False, "em_tree": False, "valid": True}
    assert score_one(ref, "[IN:A [SL:B x y ]") == {"em": False, "em_tree": False, "valid": False}
    assert score_one(ref, None) == {"em": False, "em_tree": False, "valid": False}
    assert score_one(ref, "") == {"em": False, "em_tree": False, "valid": False}
    # lower-case labels: EM and EM-tree are case-insensitive, validity is not
    assert score_one(ref, "[in:a [sl:b X Y ] ]") == {"em": True, "em_tree": True, "valid": False}
    g = Grammar.extract([ref])
    assert score_one(ref, "[IN:A [SL:C x y ] ]", g)["valid"] is False
    assert score_one(ref, "[IN:A [SL:B z ] ]", g)["valid"] is True


def test_word_errors_handles_empty_strings() -> None:
    assert word_errors(["", "a b"], ["x y", "a b"]) == (2, 2)
    assert word_errors(["a b c"], [""]) == (3, 3)
    assert word_errors([""], [""]) == (0, 0)
    only_empty = score([{"id": 1, "transcript": "", "logical_form": "[IN:A ]"}],
                       [{"id": 1, "transcript": "", "logical_form": "[IN:A ]"}])
    assert (only_empty["wer"], only_empty["em"]) == (0.0, 1.0)
    inserted = score([{"id": 1, "transcript": "", "logical_form": "[IN:A ]"}],
                     [{"id": 1, "transcript": "hello", "logical_form": "[IN:A ]"}])
    assert inserted["wer"] == 1.0


def test_score_errors() -> None:
    with pytest.raises(ScoreError, match="no references"):
        score([], [])
    with pytest.raises(ScoreError, match="reference '1': malformed tree at char"):
        score([{"id": 1, "transcript": "a", "logical_form": "[IN:A"}], [])
    with pytest.raises(ScoreError, match="duplicate id '1'"):
        score(REFS[:1] * 2, [])


def _jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def test_cli_json_and_table(tmp_path: Path, capsys) -> None:
    ref, hyp = _jsonl(tmp_path / "ref.jsonl", REFS), _jsonl(tmp_path / "hyp.jsonl", HYPS)
    g = GRAMMAR.save(tmp_path / "g.json")
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp), "--grammar", str(g), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("n", "em", "em_tree", "validity", "wer")} == _approx(
        {"n": 4, "em": 0.25, "em_tree": 0.5, "validity": 0.5, "wer": 1 / 3})
    assert out["missing"] == {"count": 1, "ids": ["3"]} and out["ignored"]["count"] == 1
    assert set(out["per_domain"]) == {"alarm", "music", "unknown"}
    assert set(out["per_domain"]["alarm"]) >= {"n", "em", "em_tree", "validity", "wer"}
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[2].split() == ["all", "4", "25.00", "50.00", "75.00", "33.33"]
    assert lines[3].split() == ["alarm", "2", "0.00", "50.00", "50.00", "50.00"]
    assert "1 references have no hypothesis (scored as wrong): 3" in captured.err
    assert "1 hypotheses have no reference (ignored): zz" in captured.err


@pytest.mark.parametrize("bad_line, which, reason", [
    ("{not json", "hyp", "invalid JSON"),
    ("[1, 2]", "hyp", "expected a JSON object, got list"),
    ('{"transcript": "a", "logical_form": "[IN:A ]"}', "hyp", 'missing "id"'),
    ('{"id": 1, "transcript": 3, "logical_form": "[IN:A ]"}', "hyp", '"transcript" must be a string or null'),
    ('{"id": 9, "transcript": "a"}', "ref", 'reference needs a string "logical_form"'),
    ('{"id": 9, "transcript": "a", "logical_form": "[IN:A"}', "ref", "reference logical_form: malformed tree at char 5"),
    ('{"id": 1, "transcript": "a", "logical_form": "[IN:A ]"}', "ref", "duplicate id '1' (first on line 1)"),
])
def test_cli_malformed_jsonl(tmp_path: Path, capsys, bad_line: str, which: str, reason: str) -> None:
    refs: list = list(REFS)
    hyps: list = list(HYPS)
    (refs if which == "ref" else hyps).insert(2, "")          # blank lines are skipped
    (refs if which == "ref" else hyps).append(bad_line)
    ref, hyp = _jsonl(tmp_path / "ref.jsonl", refs), _jsonl(tmp_path / "hyp.jsonl", hyps)
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp), "--json"]) == 2
    path = ref if which == "ref" else hyp
    lineno = len(refs if which == "ref" else hyps)
    assert f"{path}:{lineno}: {reason}" in capsys.readouterr().err


def test_cli_missing_files(tmp_path: Path, capsys) -> None:
    ref = _jsonl(tmp_path / "ref.jsonl", REFS)
    assert main(["score", "--ref", str(ref), "--hyp", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: cannot read" in capsys.readouterr().err
    hyp = _jsonl(tmp_path / "hyp.jsonl", HYPS)
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp), "--grammar", str(tmp_path / "g.json")]) == 2
    assert "g.json: no such grammar file and not a shipped grammar name" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# parity with the fairseq STOP scorer, written from its definition
# (fairseq/tasks/nlu_finetuning.py, _inference_with_wer_parse): the target is a token stream in
# which each bracket/label token ("[IN:X", "]") is one token and words are spelled letter by
# letter with "_" between words; post_process drops eos and "|", turns "_" into a space and puts a
# space after each bracket/label token; EM is equality of the joined, stripped strings, EM-tree
# equality of the lists of tokens holding "[" or "]". Public recipes lower-case both sides.

def _fairseq_stream(lf: str) -> list[str]:
    out: list[str] = []
    for w in lf.lower().split():
        if "[" in w or "]" in w:
            out.append(w)
        else:
            out += list(w) + ["_"]
    return out


def _fairseq_post_process(stream: list[str]) -> list[str]:
    o: list[str] = []
    for w in stream:
        if w in ("</s>", "|"):
            continue
        if w == "_":
            o.append(" ")
        else:
            o.append(w)
            if "[" in w or "]" in w:
                o.append(" ")
    return o


def _fairseq_scores(refs: list[dict], hyps: dict[str, dict]) -> tuple[float, float]:
    em = tree = 0
    for r in refs:
        h = hyps.get(r["id"], {}).get("logical_form") or ""
        hl, rl = _fairseq_post_process(_fairseq_stream(h)), _fairseq_post_process(_fairseq_stream(r["logical_form"]))
        em += " ".join("".join(hl).split()) == " ".join("".join(rl).split())
        tree += [w for w in hl if "[" in w or "]" in w] == [w for w in rl if "[" in w or "]" in w]
    return em / len(refs), tree / len(refs)


def test_em_and_em_tree_match_the_fairseq_stop_scorer(capsys) -> None:

    data = Path(__file__).parent / "data" / "score"
    refs = read_jsonl(data / "ref.jsonl", reference=True)
    hyps = read_jsonl(data / "hyp.jsonl", reference=False)
    scorable = [r for r in refs if r["logical_form"].strip().lower() not in ("", "nan")]
    em, em_tree = _fairseq_scores(scorable, {h["id"]: h for h in hyps})
    result = score(refs, hyps)
    assert (result["em"], result["em_tree"]) == (em, em_tree)
    assert result["n"] == len(scorable) == 10
    assert 0 < em < em_tree < 1                       # the fixture tells the two metrics apart
    assert result["empty_references"] == {"count": 2, "ids": ["k", "l"]}
    assert result["ignored"]["count"] == 0           # a hypothesis for an empty reference is not "ignored"
    for r in scorable:                                 # and one by one
        one = score_one(r["logical_form"], next(h for h in hyps if h["id"] == r["id"])["logical_form"])
        assert (one["em"], one["em_tree"]) == _fairseq_scores([r], {h["id"]: h for h in hyps})
    assert main(["score", "--ref", str(data / "ref.jsonl"), "--hyp", str(data / "hyp.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["em"] == em and out["empty_references"]["count"] == 2
