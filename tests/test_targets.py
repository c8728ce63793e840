"""Tests for conslu.targets: both target formats, their inverse, and malformed generations."""

from __future__ import annotations

import json

import pytest

from conslu.targets import (
    SEPARATOR,
    TARGET_FORMATS,
    WHISLU_SUFFIX,
    build_target,
    parse_whislu,
    split_target,
    whislu_prefix,
)

T = "please pause the song"
LF = "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]"


def test_simplified_exact_text_and_round_trip() -> None:
    assert SEPARATOR == "|" and TARGET_FORMATS == ("simplified", "whislu")
    text = build_target(T, LF)
    assert text == "please pause the song | [IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]"
    assert split_target(text) == (T, LF)


def test_whislu_exact_text_and_round_trip() -> None:
    text = build_target(T, LF, "whislu", gender="Female", native="Yes", domain="music")
    assert text == ('{ "Gender": "Female", "Native": "Yes", "Text": "please pause the song", "Domain": "music", '
                    '"Intent": "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]" }')
    assert json.loads(text) == {"Gender": "Female", "Native": "Yes", "Text": T, "Domain": "music", "Intent": LF}
    assert split_target(text, "whislu") == (T, LF)
    assert text == whislu_prefix(T, gender="Female", native="Yes", domain="music") + LF + WHISLU_SUFFIX


def test_whislu_unknown_metadata_and_escaping() -> None:
    text = build_target('say "hi" café', "[IN:A ]", "whislu", gender="", native=None)
    data = json.loads(text)
    assert data["Gender"] == data["Native"] == data["Domain"] == "Unknown"
    assert "café" in text  # non-ASCII kept as is
    assert split_target(text, "whislu") == ('say "hi" café', "[IN:A ]")


@pytest.mark.parametrize("fmt", TARGET_FORMATS)
def test_round_trip_many(fmt: str) -> None:
    cases = [("", "[IN:GET_ALARM ]"), ("a | b", "[IN:X [SL:Y b ] ]"),
             ("remind me to text renee", "[IN:CREATE_REMINDER [SL:TODO [IN:SEND_MESSAGE [SL:RECIPIENT renee ] ] ] ]")]
    for transcript, lf in cases:
        assert split_target(build_target(transcript, lf, fmt, domain="d"), fmt) == (transcript, lf)


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown target format"):
        build_target(T, LF, "json")
    with pytest.raises(ValueError, match="unknown target format"):
        split_target(T, "json")


@pytest.mark.parametrize("text, expected", [
    ("please pause the song", ("please pause the song", None)),                      # no separator
    ("please pause | ", ("please pause", None)),                                    # nothing after it
    (f"{T} | {LF} and more", (T, None)),                                           # extra text after the tree
    (f"{T} | [IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ]", (T, None)),                    # unclosed
    (f"{T} | [pause_music ]", (T, None)),                                          # bad label
    (f"  {T}   |   [IN:PAUSE_MUSIC   [SL:MUSIC_TYPE song]]  ", (T, LF)),            # spacing is normalised
    (f"{T}|{LF}", (T, LF)),
    ("", ("", None)),
])
def test_split_simplified_malformed(text: str, expected: tuple) -> None:
    assert split_target(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('{ "Gender": "Female", "Text": "pause", "Intent": "[IN:PAUSE_MUSIC ]" } trailing', ("pause", "[IN:PAUSE_MUSIC ]")),
    ('{ "Gender": "Female", "Text": "pause", "Intent": "[IN:PAUSE_MUSIC ' , ("pause", None)),   # cut off mid-tree
    ('{ "Gender": "Female", "Text": "pause", "Intent": "[IN:PAUSE_MUSIC ]', ("pause", "[IN:PAUSE_MUSIC ]")),  # no closing
    ('{ "Gender": Female, "Text": "pause", "Intent": "[IN:A ]" }', ("pause", "[IN:A ]")),  # broken JSON elsewhere
    ('{ "Text": "pause" }', ("pause", None)),                                                  # no Intent
    ('{ "Text": "pause", "Intent": "[IN:A ] junk" }', ("pause", None)),                        # extra text in the tree
    ('{ "Text": 5, "Intent": 7 }', ("5", None)),                                               # wrong types
    ("not json at all", ("", None)),
    ("[1, 2]", ("", None)),
    ("", ("", None)),
])
def test_split_whislu_malformed(text: str, expected: tuple) -> None:
    assert split_target(text, "whislu") == expected


def test_split_never_raises_on_garbage() -> None:
    for text in ["{" * 5000, "}" * 10, '"Intent": "\\', "|" * 50, "[" * 2000, "\x00\ud800"]:
        for fmt in TARGET_FORMATS:
            transcript, lf = split_target(text, fmt)
            assert isinstance(transcript, str) and lf is None


def test_parse_whislu_fields() -> None:
    text = build_target(T, LF, "whislu", gender="Male", native="No", domain="music")
    assert parse_whislu(text) == {"Gender": "Male", "Native": "No", "Text": T, "Domain": "music", "Intent": LF}
