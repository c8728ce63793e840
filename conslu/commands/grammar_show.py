"""``conslu grammar show GRAMMAR [--json] [--check DATA...]``: a grammar's statistics and, with
``--check``, the trees in DATA it cannot express (:func:`conslu.grammar.check_coverage`). GRAMMAR is
a grammar JSON file or a shipped short name such as ``topv2`` (:func:`conslu.grammar.load_grammar`)."""

from __future__ import annotations

import argparse
import json

from conslu.commands._options import error
from conslu.grammar import shipped_grammars

NAME = "grammar show"
HELP = "print a grammar's statistics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grammar", metavar="GRAMMAR",
                   help=f"a grammar JSON file or a shipped name ({', '.join(shipped_grammars()) or 'none'})")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", nargs="*", default=None, metavar="DATA", help="report how many trees in DATA the grammar cannot express")


def run(args: argparse.Namespace) -> int:
    from conslu.grammar import Grammar, GrammarError, check_coverage, resolve_data, resolve_grammar
    from conslu.logical_form import ROOT

    try:
        path = resolve_grammar(args.grammar)
        grammar = Grammar.load(path)
        check = None
        if args.check is not None:
            if not args.check:
                return error("--check needs at least one DATA file or folder")
            check = check_coverage(grammar, resolve_data(args.check, splits=("eval", "test")))
    except (GrammarError, OSError) as e:
        return error(str(e))
    if args.json:
        out = dict(grammar.stats())
        out["trees"] = grammar.n_trees
        out["sources"] = grammar.sources
        out["file"] = str(path)
        if check is not None:
            out["check"] = check
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    s = grammar.stats()
    print(f"grammar {args.grammar}" + ("" if str(path) == args.grammar else f"  ({path})"))
    for key in ("intents", "slots", "pairs", "max_depth"):
        print(f"  {key:<10} {s[key]:>6}")
    print(f"  {'trees':<10} {grammar.n_trees:>6}")
    for src in grammar.sources:
        print(f"  source     {src.get('path')}  sha256 {str(src.get('sha256', ''))[:12]}")
    print()
    width = max([len(p) for p in grammar.children] + [6])
    print(f"  {'parent':<{width}}  children  occurrences")
    for parent in sorted(grammar.children, key=lambda p: (p != ROOT, p)):
        total = sum(grammar.counts.get(parent, {}).values())
        print(f"  {parent:<{width}}  {len(grammar.children[parent]):>8}  {total:>11}")
    if check is not None:
        print()
        print(f"check: {check['inexpressible']} of {check['n']} trees ({100 * check['fraction']:.2f}%) "
              f"use a pair the grammar does not allow; {check['malformed']} malformed row(s) skipped")
        for f in check["files"]:
            print(f"  {f['path']}: {f['inexpressible']} of {f['n']}")
        if check["unseen_pairs"]:
            print(f"  unseen pairs ({len(check['unseen_pairs'])}):")
            for up in check["unseen_pairs"]:
                print(f"    {up['parent']} -> {up['child']}  ({up['trees']} trees)")
    return 0
