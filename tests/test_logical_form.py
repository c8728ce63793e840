"""Tests for conslu.logical_form: parsing, round trips, errors, decoupled form, skeletons."""

from __future__ import annotations

from pathlib import Path

import pytest

from conslu.logical_form import (
    ROOT,
    MalformedTreeError,
    Tree,
    decouple,
    depth,
    is_well_formed,
    labels,
    pair_list,
    pairs,
    parse_tree,
    skeleton,
    tokens,
    words,
)

from conftest import NO_TOPV2, TOPV2_DIR, TOPV2_SAMPLE
NESTED = ("[IN:CREATE_REMINDER Remind [SL:PERSON_REMINDED me ] to [SL:TODO [IN:SEND_MESSAGE text "
          "[SL:RECIPIENT Renee ] ] when it 's ] [SL:DATE_TIME after 10 am ] . ]")


def _topv2_trees(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*_*.tsv")):
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            col = header.index("semantic_parse")
            out.extend(line.rstrip("\n").split("\t")[col] for line in fh if line.strip())
    return out


def test_round_trip_sample_trees() -> None:
    trees = _topv2_trees(TOPV2_SAMPLE)
    assert len(trees) > 600 and all(str(parse_tree(s)) == s for s in trees)


@pytest.mark.skipif(TOPV2_DIR is None, reason=NO_TOPV2)
def test_round_trip_every_topv2_tree() -> None:
    trees = _topv2_trees(TOPV2_DIR)
    assert len(trees) > 140_000  # train + eval of all 8 domains
    bad = [s for s in trees if str(parse_tree(s)) != s]
    assert bad == []


def test_parse_structure() -> None:
    t = parse_tree(NESTED)
    assert t.label == "IN:CREATE_REMINDER" and t.is_intent
    assert t.children[0] == "Remind"
    todo = t.children[3]
    assert isinstance(todo, Tree) and todo.label == "SL:TODO" and todo.is_slot
    assert isinstance(todo.children[0], Tree) and todo.children[0].label == "IN:SEND_MESSAGE"
    assert todo.children[1:] == ["when", "it", "'s"]
    assert str(t) == NESTED


def test_extra_whitespace_is_tolerated_and_canonicalised() -> None:
    t = parse_tree("  [IN:A  a\t[SL:B b]]\n")
    assert str(t) == "[IN:A a [SL:B b ] ]"
    assert str(parse_tree("[ IN:A [SL:B x ] ]")) == "[IN:A [SL:B x ] ]"
    assert parse_tree("[IN:A ]") == Tree("IN:A")


@pytest.mark.parametrize("text, position, fragment", [
    ("", 0, "empty input"),
    ("   ", 3, "empty input"),
    ("[IN:A [SL:B x ]", 15, "opened at char 0 is never closed"),
    ("[IN:A [SL:B x ", 14, "'[SL:B' opened at char 6 is never closed"),
    ("] [IN:A ]", 0, "unbalanced ']' before any '['"),
    ("[IN:A ] ]", 8, "unbalanced ']' after the root is closed"),
    ("[IN:A [ ] ]", 6, "empty label"),
    ("[IN:A [ x ] ]", 8, "label 'x' lacks an IN:/SL: prefix"),
    ("[IN:A []", 6, "empty label"),
    ("[IN:A [FOO x ] ]", 7, "lacks an IN:/SL: prefix"),
    ("[in:a ]", 1, "lacks an IN:/SL: prefix"),
    ("[IN: x ]", 1, "empty or bad name"),
    ("hello [IN:A ]", 0, "outside the root"),
    ("[IN:A ] bye", 8, "trailing text 'bye'"),
    ("[IN:A ] [IN:B ]", 8, "trailing text after the root"),
])
def test_malformed_inputs_name_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(MalformedTreeError) as info:
        parse_tree(text)
    err = info.value
    assert err.position == position
    assert fragment in str(err)
    assert str(err).startswith(f"malformed tree at char {position}: ")
    assert isinstance(err, ValueError)
    assert not is_well_formed(text)


def test_non_string_input_is_malformed() -> None:
    with pytest.raises(MalformedTreeError):
        parse_tree(None)  # type: ignore[arg-type]


def test_decouple_hand_made() -> None:
    assert str(decouple(parse_tree("[IN:GET_WEATHER what is the weather [SL:LOCATION in paris ] ]"))) == \
        "[IN:GET_WEATHER [SL:LOCATION in paris ] ]"
    assert str(decouple("[IN:GET_ALARM show my alarms ]")) == "[IN:GET_ALARM ]"
    # a nested intent inside a slot loses its own words; its slots keep theirs
    assert str(decouple(NESTED)) == ("[IN:CREATE_REMINDER [SL:PERSON_REMINDED me ] [SL:TODO [IN:SEND_MESSAGE "
                                     "[SL:RECIPIENT Renee ] ] when it 's ] [SL:DATE_TIME after 10 am ] ]")
    assert str(decouple("[IN:A [SL:B [IN:C home ] ] ]")) == "[IN:A [SL:B [IN:C ] ] ]"
    # STOP's documented example
    assert str(decouple("[IN:CREATE_ALARM set the alarm [SL:DATE_TIME for seven thirty tonight ] ]")) == \
        "[IN:CREATE_ALARM [SL:DATE_TIME for seven thirty tonight ] ]"
    once = decouple(NESTED)
    assert decouple(once) == once  # idempotent


def test_skeleton_tokens_labels_pairs_depth_words() -> None:
    assert skeleton(NESTED) == ("[IN:CREATE_REMINDER [SL:PERSON_REMINDED ] [SL:TODO [IN:SEND_MESSAGE "
                                "[SL:RECIPIENT ] ] ] [SL:DATE_TIME ] ]")
    assert skeleton(parse_tree("[IN:A ]")) == "[IN:A ]"
    assert tokens("[IN:A x [SL:B y ] ]") == ["[IN:A", "x", "[SL:B", "y", "]", "]"]
    assert tokens("[ IN:A x[SL:B  y]]") == ["[IN:A", "x", "[SL:B", "y", "]", "]"]
    assert tokens("[IN:A x") == ["[IN:A", "x"]  # malformed text still tokenises
    assert tokens(NESTED) == NESTED.split()
    assert labels(NESTED) == ["IN:CREATE_REMINDER", "SL:PERSON_REMINDED", "SL:TODO", "IN:SEND_MESSAGE",
                              "SL:RECIPIENT", "SL:DATE_TIME"]
    assert pairs(NESTED) == {(ROOT, "IN:CREATE_REMINDER"), ("IN:CREATE_REMINDER", "SL:PERSON_REMINDED"),
                             ("IN:CREATE_REMINDER", "SL:TODO"), ("SL:TODO", "IN:SEND_MESSAGE"),
                             ("IN:SEND_MESSAGE", "SL:RECIPIENT"), ("IN:CREATE_REMINDER", "SL:DATE_TIME")}
    assert pair_list("[IN:A [SL:B ] [SL:B ] ]") == [(ROOT, "IN:A"), ("IN:A", "SL:B"), ("IN:A", "SL:B")]
    assert depth("[IN:A ]") == 1
    assert depth("[IN:A x [SL:B y ] ]") == 2
    assert depth(NESTED) == 4
    assert words(decouple(NESTED)) == ["me", "Renee", "when", "it", "'s", "after", "10", "am"]


def test_tree_equality_and_building() -> None:
    built = Tree("IN:A", ["x", Tree("SL:B", ["y"])])
    assert str(built) == "[IN:A x [SL:B y ] ]"
    assert parse_tree(str(built)) == built
    assert built != parse_tree("[IN:A x [SL:B z ] ]")
    assert len({built, parse_tree("[IN:A x [SL:B y ] ]")}) == 1
    assert [n.label for n in parse_tree(NESTED).subtrees()] == labels(NESTED)
