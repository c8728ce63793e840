"""Scores: exact match (EM), EM-tree, validity and transcript WER.

Definitions (per reference; a hypothesis is matched to its reference by ``id``):

* **EM**: the token sequences (:func:`conslu.logical_form.tokens`) of the two logical forms are
  equal after lower-casing, i.e. case-insensitive and whitespace-normalised, as in the public STOP
  recipes.
* **EM-tree**: the label skeletons (the same tokens with the words dropped: ``[IN:X``, ``[SL:Y``,
  ``]``) are equal, also case-insensitive; the reference is well-formed, so a hypothesis with the
  same skeleton has the same intents, slots and nesting. EM implies EM-tree.
* **validity**: the hypothesis is a well-formed tree and, when a grammar is given, every
  parent-child pair in it is allowed by the grammar.
* **WER**: corpus-level word error rate of the transcripts (lower-cased, whitespace-normalised),
  via jiwer: total substitutions + deletions + insertions over total reference words. A reference
  with no words adds only the hypothesis' words as insertions. With no reference words at all, WER
  is 0.0 when no hypothesis has a word and 1.0 otherwise.

A reference without a hypothesis counts as wrong (EM 0, EM-tree 0, invalid, empty transcript) and is
reported under ``missing``; hypotheses whose id is not among the references are reported under
``ignored``. A reference without ``domain`` is grouped under ``"unknown"`` in ``per_domain``. A
reference whose logical form is empty (or ``nan``; real STOP releases have such rows) cannot be
scored: it is left out and reported under ``empty_references``.

EM and EM-tree agree with the fairseq STOP scorer (``fairseq/tasks/nlu_finetuning.py``: equality of
the decoupled trees' strings, and of their bracket/label token lists) on lower-cased trees;
``tests/test_metrics.py`` checks it on a fixture.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import jiwer

from conslu.grammar import Grammar
from conslu.jsonl import JSONLError, iter_jsonl
from conslu.logical_form import MalformedTreeError, is_empty_tree, is_well_formed, parse_tree, tokens

FIRST_IDS = 10  # how many missing/ignored ids are listed


class ScoreError(ValueError):
    """Bad score input; the message names the file and line (or the id)."""


def _norm_words(text: Any) -> str:
    return " ".join(str(text or "").lower().split())


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> tuple[int, int]:
    """(errors, reference words) over a corpus; empty references/hypotheses are fine."""
    pairs = [(_norm_words(r), _norm_words(h)) for r, h in zip(refs, hyps, strict=True)]
    errors = sum(len(h.split()) for r, h in pairs if not r)
    nonempty = [(r, h) for r, h in pairs if r]
    n_words = sum(len(r.split()) for r, _ in nonempty)
    if nonempty:
        out = jiwer.process_words([r for r, _ in nonempty], [h for _, h in nonempty])
        errors += out.substitutions + out.deletions + out.insertions
    return errors, n_words


def _wer(errors: int, n_words: int) -> float:
    if n_words == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / n_words


def _lf(value: Any) -> str:
    return value if isinstance(value, str) else ""




def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    errors, n_words = word_errors([r["ref_t"] for r in rows], [r["hyp_t"] for r in rows])
    return {
        "n": n,
        "em": sum(r["em"] for r in rows) / n,
        "em_tree": sum(r["em_tree"] for r in rows) / n,
        "validity": sum(r["valid"] for r in rows) / n,
        "wer": _wer(errors, n_words),
        "word_errors": errors,
        "ref_words": n_words,
    }


def _index(items: list[dict], what: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ScoreError(f"{what} #{i}: expected an object with an \"id\"")
        key = str(item["id"])
        if key in out:
            raise ScoreError(f"{what} #{i}: duplicate id {key!r}")
        out[key] = item
    return out


def _skeleton_tokens(toks: list[str]) -> list[str]:
    return [t for t in toks if t[0] == "[" or t == "]"]


def score_one(ref_lf: str, hyp_lf: str | None, grammar: Grammar | None = None) -> dict[str, bool]:
    """EM / EM-tree / validity of one hypothesis logical form against a reference.

    EM and EM-tree are lexical and case-insensitive (so EM implies EM-tree); validity is not.
    """
    hyp = _lf(hyp_lf)
    ref_toks, hyp_toks = tokens(ref_lf.lower()), tokens(hyp.lower())
    em = ref_toks == hyp_toks
    em_tree = em or _skeleton_tokens(ref_toks) == _skeleton_tokens(hyp_toks)
    if grammar is not None:
        valid = grammar.is_valid(hyp)
    else:
        valid = is_well_formed(hyp)
    return {"em": em, "em_tree": em_tree, "valid": valid}


def score(refs: list[dict], hyps: list[dict], grammar: Grammar | None = None) -> dict:
    """Score hypotheses against references (dicts with id, transcript, logical_form[, domain]).

    Returns ``{n, em, em_tree, validity, wer, word_errors, ref_words, per_domain: {domain: same
    keys}, missing: {count, ids}, ignored: {count, ids}}`` (fractions in [0, 1], WER may exceed 1).
    A malformed reference logical form raises :class:`ScoreError` naming its id.
    """
    ref_by_id = _index(refs, "reference")
    hyp_by_id = _index(hyps, "hypothesis")
    if not ref_by_id:
        raise ScoreError("no references to score")
    rows: list[dict] = []
    missing: list[str] = []
    empty = [key for key, ref in ref_by_id.items() if is_empty_tree(ref.get("logical_form"))]
    for key in empty:
        del ref_by_id[key]
    if not ref_by_id:
        raise ScoreError(f"no references to score ({len(empty)} with an empty logical form)")
    for key, ref in ref_by_id.items():
        ref_lf = _lf(ref.get("logical_form"))
        try:
            parse_tree(ref_lf)
        except MalformedTreeError as e:
            raise ScoreError(f"reference {key!r}: {e}") from None
        hyp = hyp_by_id.get(key)
        if hyp is None:
            missing.append(key)
            flags = {"em": False, "em_tree": False, "valid": False}
            hyp_t = ""
        else:
            flags = score_one(ref_lf, hyp.get("logical_form"), grammar)
            hyp_t = hyp.get("transcript") or ""
        domain = ref.get("domain")
        rows.append({**flags, "ref_t": ref.get("transcript") or "", "hyp_t": hyp_t,
                     "domain": str(domain) if domain not in (None, "") else "unknown"})
    result = _summary(rows)
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_domain[row["domain"]].append(row)
    result["per_domain"] = {d: _summary(rs) for d, rs in sorted(by_domain.items())}
    ignored = [k for k in hyp_by_id if k not in ref_by_id and k not in empty]
    result["empty_references"] = {"count": len(empty), "ids": empty[:FIRST_IDS]}
    result["missing"] = {"count": len(missing), "ids": missing[:FIRST_IDS]}
    result["ignored"] = {"count": len(ignored), "ids": ignored[:FIRST_IDS]}
    return result


# ----------------------------------------------------------------------------------------------
# JSONL reading and the table (`conslu score`: conslu.commands.score)


def read_jsonl(path: str | Path, *, reference: bool) -> list[dict]:
    """Read score records; errors are "file:line: reason"."""
    path = Path(path)
    out: list[dict] = []
    seen: dict[str, int] = {}
    try:
        rows = list(iter_jsonl(path))
    except JSONLError as e:
        raise ScoreError(str(e)) from None
    for lineno, item in rows:
        if "id" not in item or item["id"] is None:
            raise ScoreError(f"{path}:{lineno}: missing \"id\"")
        for key in ("transcript", "logical_form"):
            value = item.get(key)
            if reference and not isinstance(value, str):
                raise ScoreError(f"{path}:{lineno}: reference needs a string \"{key}\"")
            if not reference and value is not None and not isinstance(value, str):
                raise ScoreError(f"{path}:{lineno}: \"{key}\" must be a string or null")
        if reference and not is_empty_tree(item["logical_form"]):
            try:
                parse_tree(item["logical_form"])
            except MalformedTreeError as e:
                raise ScoreError(f"{path}:{lineno}: reference logical_form: {e}") from None
        key = str(item["id"])
        if key in seen:
            raise ScoreError(f"{path}:{lineno}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        out.append(item)
    return out


def format_table(result: dict) -> str:
    """A readable table: one row for all references and one per domain (percentages)."""
    head = f"{'domain':<12} {'n':>7} {'EM':>7} {'EM-tree':>8} {'valid':>7} {'WER':>7}"
    lines = [head, "-" * len(head)]

    def row(name: str, r: dict) -> str:
        return (f"{name:<12} {r['n']:>7} {100 * r['em']:>7.2f} {100 * r['em_tree']:>8.2f} "
                f"{100 * r['validity']:>7.2f} {100 * r['wer']:>7.2f}")

    lines.append(row("all", result))
    for domain, r in result["per_domain"].items():
        lines.append(row(domain, r))
    return "\n".join(lines)
