"""``conslu normalize [TEXT ...] [--topv2 FILE_OR_DIR ...] [--report] [--json]``: STOP's spoken form
of each TEXT (:func:`conslu.normalize.normalize_text`), or, with ``--report``, how often each rule of
:mod:`conslu.normalize` fires over the utterances of TOPv2 files (``--topv2``) or the TEXTs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conslu.commands._options import error

NAME = "normalize"
HELP = "write text in STOP's spoken form; --report: how often each rule fires"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="*", metavar="TEXT", help="text to normalise (one line each)")
    p.add_argument("--topv2", nargs="*", default=None, metavar="FILE_OR_DIR",
                   help="TOPv2 files (or folders of them) whose utterances are read")
    p.add_argument("--report", action="store_true", help="print rule firing counts instead of the texts")
    p.add_argument("--json", action="store_true")


def _topv2_utterances(paths: list[str]) -> list[str]:
    """The raw ``utterance`` column of TOPv2 files (before normalisation)."""
    from conslu.data import TOPV2_COLUMNS, DataError, open_table

    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        files += sorted(p.glob("*.tsv")) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{', '.join(paths)}: no TOPv2 .tsv files")
    out: list[str] = []
    for f in files:
        rows, header = open_table(f, TOPV2_COLUMNS)
        col = header.index("utterance")
        out += [fields[col] for _, fields in rows if len(fields) == len(header)]
    return out


def run(args: argparse.Namespace) -> int:
    from conslu.data import DataError
    from conslu.normalize import normalize_text, rule_counts

    try:
        texts = list(args.text) + (_topv2_utterances(args.topv2) if args.topv2 else [])
    except (DataError, OSError) as e:
        return error(str(e))
    if not texts:
        return error("give TEXT or --topv2 FILE_OR_DIR")
    if args.report:
        counts = dict(rule_counts(texts).most_common())
        if args.json:
            print(json.dumps({"utterances": len(texts), "rules": counts}, indent=1))
        else:
            print(f"{'rule':<20} {'fires':>7}   (over {len(texts)} utterances)")
            for rule, n in counts.items():
                print(f"{rule:<20} {n:>7}")
        return 0
    out = [normalize_text(t) for t in texts]
    print(json.dumps(out, indent=1) if args.json else "\n".join(out))
    return 0
