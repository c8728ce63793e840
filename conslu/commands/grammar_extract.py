"""``conslu grammar extract DATA... --out G.json``: a label grammar from STOP manifests or TOPv2 files
(:meth:`conslu.grammar.Grammar.from_files`). Exit 2 when the data gives no trees or cannot be read."""

from __future__ import annotations

import argparse
import sys

from conslu.commands._options import error

NAME = "grammar extract"
HELP = "build a grammar from STOP manifests or TOPv2 files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="STOP manifest .tsv files, STOP root folders, or TOPv2 .tsv files")
    p.add_argument("--out", required=True, help="grammar JSON to write")
    p.add_argument("--field", default=None, help="logical-form column to read (default: decoupled for STOP, semantic_parse for TOPv2)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (reported) instead of failing")


def run(args: argparse.Namespace) -> int:
    from conslu.grammar import Grammar, GrammarError, resolve_data

    try:
        paths = resolve_data(args.data, splits=("train",))
        skipped: list[str] = []
        grammar = Grammar.from_files(paths, field=args.field, skip_bad=args.skip_bad, skipped=skipped)
        if grammar.n_trees == 0:
            return error(f"no trees found in {', '.join(map(str, paths))}")
        out = grammar.save(args.out)
    except (GrammarError, OSError) as e:
        return error(str(e))
    s = grammar.stats()
    print(f"wrote {out}: {grammar.n_trees} trees from {len(paths)} file(s); {s['intents']} intents, "
          f"{s['slots']} slots, {s['pairs']} pairs, max depth {s['max_depth']}")
    if skipped:
        print(f"skipped {len(skipped)} malformed row(s); first: {skipped[0]}", file=sys.stderr)
    return 0
