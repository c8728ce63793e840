"""Evaluating a ConSLU model on a STOP split (official or the synthetic corpus of ``conslu synth``):
the split's rows, their audio, the default predictions file and the references to score against.

The command (``conslu evaluate``, :mod:`conslu.commands.evaluate`) decodes the rows with
:func:`conslu.runner.run_files` and scores the predictions with :func:`conslu.metrics.score`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from conslu.parse import directory_error
from conslu.runner import Item

__all__ = ["EVAL_DIR", "default_output", "read_split", "items", "references"]

EVAL_DIR = Path("runs") / "eval"


def default_output(model: str, data: str, split: str, decoding: dict) -> Path:
    """``runs/eval/<model name>-<split>-<hash>.jsonl``; the hash tells apart models/corpora of the same
    name and decoding settings (``decoding``: ``DecodingOptions.as_dict()`` less what does not change outputs)."""
    ident = json.dumps([str(Path(model).resolve()), str(Path(data).resolve()), split, decoding], sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    name = Path(model).resolve().name or "model"
    return EVAL_DIR / f"{name}-{split}-{digest}.jsonl"


def read_split(data: str, split: str, *, domains: list[str] | None = None, limit: int | None = None,
               skip_bad: bool = False, warn: Callable[[str], None] = lambda msg: None,
               notes: list[str] | None = None) -> list[dict]:
    """The rows of one split (:func:`conslu.data.read_stop`: every recording, both parts, the
    folder quirk resolved). A missing audio file is not an error here (that utterance fails alone, scored
    as wrong; a missing part folder is said once). Rows with an empty reference are skipped and
    said on ``warn`` (and appended to ``notes``). With ``skip_bad`` bad manifest rows are left out
    and reported on ``warn``. Raises ValueError (``DataError``) for unusable data, including an id
    that occurs twice (:func:`conslu.data.read_stop` refuses it)."""
    from conslu.data import read_stop

    skipped: list[str] = []
    said: list[str] = []
    ds = read_stop(data, split, domains=domains or None, limit=limit, skip_bad=skip_bad, check_audio=False,
                   skipped=skipped, notes=said)
    for msg in said:
        warn(f"conslu: {msg}")
    if notes is not None:
        notes.extend(said)
    for msg in skipped:  # --skip-bad: say what was left out (not scored)
        warn(f"conslu: skipped {msg}")
    if skipped:
        warn(f"conslu: {len(skipped)} bad manifest row(s) skipped (not scored)")
    return [dict(r) for r in ds]


def items(rows: list[dict]) -> list[Item]:
    """One item per row, keyed by id; its record starts with ``id``, ``file``, ``domain``."""
    out = []
    for r in rows:
        audio = r.get("audio") or None
        error = directory_error(audio) if audio else f"{r['id']}: no audio file"
        out.append(Item(str(r["id"]), audio, {"id": r["id"], "file": r.get("audio"), "domain": r.get("domain")},
                        error=error))
    return out


def references(rows: list[dict]) -> list[dict]:
    """The rows as :func:`conslu.metrics.score` references."""
    return [{"id": r["id"], "domain": r.get("domain"), "transcript": r.get("transcript") or "",
             "logical_form": r.get("logical_form") or ""} for r in rows]
