"""Decoder target texts and their inverse.

Two formats:

``simplified`` (ConSLU)::

    please pause the song | [IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]

i.e. ``f"{transcript} | {logical_form}"``.

``whislu`` (the WhiSLU baseline's JSON-style multitask target). The exact text is one line, keys
in this fixed order, each value a JSON string (``json.dumps``, non-ASCII kept), ``", "`` between
items, ``": "`` after keys, ``"{ "`` and ``" }"`` around::

    { "Gender": "Female", "Native": "Yes", "Text": "please pause the song", "Domain": "music", "Intent": "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]" }

A missing (``None`` or blank) gender, native or domain is written as ``"Unknown"``. The logical
form is the last value, so a decoder reaches it after the transcript: the text before it is
:func:`whislu_prefix` and the text after it is :data:`WHISLU_SUFFIX`.

:func:`split_target` turns generated text back into ``(transcript, logical_form)``; it never
raises, and returns ``None`` for the logical form when it is missing or not a well-formed tree.
"""

from __future__ import annotations

import json
import re

from conslu.logical_form import MalformedTreeError, parse_tree

SEPARATOR = "|"
TARGET_FORMATS = ("simplified", "whislu")
UNKNOWN = "Unknown"
WHISLU_KEYS = ("Gender", "Native", "Text", "Domain", "Intent")
WHISLU_SUFFIX = '" }'


def _check_format(fmt: str) -> None:
    if fmt not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {fmt!r} (choose from {', '.join(TARGET_FORMATS)})")


def _meta(value: object) -> str:
    text = "" if value is None else str(value).strip()
    return text if text else UNKNOWN


def _js(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def whislu_prefix(transcript: str, *, gender: object = None, native: object = None, domain: object = None) -> str:
    """The WhiSLU target up to (and including) the opening quote of the ``Intent`` value."""
    return (f'{{ "Gender": {_js(_meta(gender))}, "Native": {_js(_meta(native))}, '
            f'"Text": {_js(transcript)}, "Domain": {_js(_meta(domain))}, "Intent": "')


def build_target(transcript: str, logical_form: str, fmt: str = "simplified", *,
                 gender: object = None, native: object = None, domain: object = None) -> str:
    """The decoder target text for one example (see the module docstring for the exact forms)."""
    _check_format(fmt)
    if fmt == "simplified":
        return f"{transcript} {SEPARATOR} {logical_form}"
    return whislu_prefix(transcript, gender=gender, native=native, domain=domain) + _js(logical_form)[1:-1] + WHISLU_SUFFIX


def _canonical_tree(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return str(parse_tree(text))
    except MalformedTreeError:
        return None


def _split_simplified(text: str) -> tuple[str, str | None]:
    # The first "|" whose right side starts a tree; transcripts may (rarely) contain "|" themselves.
    cut = -1
    for m in re.finditer(re.escape(SEPARATOR), text):
        if text[m.end():].lstrip().startswith("["):
            cut = m.start()
            break
    if cut < 0:
        cut = text.find(SEPARATOR)
    if cut < 0:
        return " ".join(text.split()), None
    transcript = " ".join(text[:cut].split())
    return transcript, _canonical_tree(text[cut + len(SEPARATOR):])


_JSON_FIELD = r'"{key}"\s*:\s*"((?:[^"\\]|\\.)*)"'


def parse_whislu(text: str) -> dict[str, str]:
    """The fields of a (possibly damaged) WhiSLU text; never raises.

    Tries strict JSON on the outermost ``{...}`` first, then picks ``"Key": "value"`` pairs out of
    the text one by one, so one broken field does not lose the others.
    """
    fields: dict[str, str] = {}
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            data = json.loads(text[start:end + 1])
        except (json.JSONDecodeError, RecursionError):
            data = None
        if isinstance(data, dict):
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items() if isinstance(k, str)}
    for key in WHISLU_KEYS:
        m = re.search(_JSON_FIELD.format(key=key), text)
        if m:
            try:
                fields[key] = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                fields[key] = m.group(1)
    if "Intent" not in fields:
        # The generation may have stopped before the closing quote: take the rest of the text.
        m = re.search(r'"Intent"\s*:\s*"(.*)$', text, flags=re.S)
        if m:
            fields["Intent"] = m.group(1).rstrip().rstrip("}").rstrip().rstrip('"')
    return fields


def split_target(text: str, fmt: str = "simplified") -> tuple[str, str | None]:
    """Generated text -> ``(transcript, logical_form)``.

    The logical form is returned in canonical form (single spaces), or ``None`` when it is missing
    or malformed (no separator, broken JSON without an ``Intent`` field, trailing text after the
    tree, ...). The transcript is whitespace-normalised; ``""`` when none can be found. Never raises
    on any text (only on an unknown ``fmt``). In the whislu format, text outside the outermost
    ``{...}`` is ignored.
    """
    _check_format(fmt)  # a wrong format name is a programming error, not a bad generation
    try:
        if not isinstance(text, str):
            return "", None
        if fmt == "simplified":
            return _split_simplified(text)
        fields = parse_whislu(text)
        transcript = " ".join(str(fields.get("Text", "")).split())
        return transcript, _canonical_tree(fields.get("Intent"))
    except Exception:  # noqa: BLE001 - generated text must never crash decoding/evaluation
        return (" ".join(text.split()) if isinstance(text, str) else ""), None
