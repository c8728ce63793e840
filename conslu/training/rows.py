"""Training rows (dicts of :mod:`conslu.data`): lengths for bucketing, manifest locations for
messages, the check against a model's grammar, and the report of rows left out."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from conslu.audio import AudioError, probe
from conslu.loss import uncopyable_rows

__all__ = ["target_length", "audio_paths", "usable_audio", "report_skipped", "report_notes",
           "row_location", "unlearnable_rows"]

_LABEL = re.compile(r"\[\s*((?:IN|SL):[^\s\[\]]+)")


def target_length(row: dict) -> float:
    """Characters of transcript + logical form (free to compute; ``data.bucket_by: target``)."""
    return float(len(row.get("transcript") or "") + len(row.get("logical_form") or ""))


def usable_audio(rows: list[dict], max_seconds: float | None) -> tuple[list[dict], list[str]]:
    """The rows whose audio file can be used (each gets its ``duration``) and one ``file: reason``
    message per row left out: unreadable, empty, or longer than ``max_seconds``. Only file
    headers are read."""
    keep: list[dict] = []
    bad: list[str] = []
    for r in rows:
        if not r.get("audio"):
            bad.append(f"{r.get('id')}: no audio file")
            continue
        try:
            seconds = probe(r["audio"], max_seconds=max_seconds)
        except AudioError as e:
            bad.append(str(e))
            continue
        keep.append(dict(r, duration=seconds))
    return keep, bad


def audio_paths(rows: Sequence[dict]) -> list[str]:
    """The audio file of every row; a row without one is refused (training needs speech)."""
    for r in rows:
        if not r.get("audio"):
            raise ValueError(f"example {r.get('id')!r} has no audio file; training needs speech")
    return [r["audio"] for r in rows]


def _rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0


def report_skipped(split: str, skipped: Sequence[str], limit: int = 20, what: str = "bad") -> None:
    """Print the rows left out (stderr, rank 0 only): ``data.skip_bad``'s bad rows, or
    (``what="unusable audio"``) rows whose audio cannot be used."""
    if not skipped or not _rank_zero():
        return
    for msg in skipped[:limit]:
        print(f"conslu train: skipped {msg}", file=sys.stderr)
    more = f" (first {limit} shown)" if len(skipped) > limit else ""
    print(f"conslu train: {len(skipped)} {what} {split!r} row(s) skipped{more}", file=sys.stderr)


def report_notes(notes: Sequence[str]) -> None:
    """Print the reader's notes (empty references, missing recording parts); rank 0 only."""
    if _rank_zero():
        for msg in notes:
            print(f"conslu train: {msg}", file=sys.stderr)


def row_location(data_dir: str, split: str, row: dict) -> str:
    """``manifest:line`` of a row (by its id), for error messages; the manifest alone if not found."""
    manifest = Path(data_dir) / "manifests" / f"{split}.tsv"
    if Path(data_dir).is_file():
        manifest = Path(data_dir)
    want = str(row.get("id"))
    try:
        with open(manifest, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if line.split("\t", 1)[0].strip() == want:
                    return f"{manifest}:{lineno}"
    except OSError:
        pass
    return f"{manifest}: row {want!r}"


def unlearnable_rows(rows: list[dict], labels: Sequence[str], targets: Any, chunk: int = 256) -> dict[int, str]:
    """Rows a simplified-target model cannot be trained on, by position, with the reason: a label
    its grammar lacks (``labels``; the row could not be encoded), or a tree whose words are not
    whole-word, in-order copies of the transcript (the constrained loss could not follow it).

    ``targets``: a :class:`conslu.batch.TargetCollator` of the model (with its tables).
    Label problems come first, then copy problems, each in row order.
    """
    known = set(labels)
    bad: dict[int, str] = {}
    for i, r in enumerate(rows):
        unknown = sorted({lab for lab in _LABEL.findall(r.get("logical_form") or "") if lab not in known})
        if unknown:
            bad[i] = f"label(s) {', '.join(unknown)} not in the model's grammar ({len(known)} labels)"
    rest = [i for i in range(len(rows)) if i not in bad]
    for start in range(0, len(rest), chunk):
        part = rest[start : start + chunk]
        batch = targets([(rows[i].get("transcript") or "", rows[i].get("logical_form") or "") for i in part],
                        with_states=False)
        for j in uncopyable_rows(batch["labels"], targets.tables):
            r = rows[part[j]]
            bad[part[j]] = ("the tree's words are not whole-word, in-order copies of the transcript "
                            f"({r.get('transcript')!r} | {r.get('logical_form')!r})")
    return bad
