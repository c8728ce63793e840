"""``conslu score --ref REF.jsonl --hyp HYP.jsonl [--grammar G.json] [--json]``: EM, EM-tree,
validity and WER of predictions (:func:`conslu.metrics.score`). Exit 2 for unreadable inputs."""

from __future__ import annotations

import argparse
import json
import sys

from conslu.commands._options import error

NAME = "score"
HELP = "score predictions (EM, EM-tree, validity, WER)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="reference JSONL (id, transcript, logical_form[, domain])")
    p.add_argument("--hyp", required=True, help="hypothesis JSONL (id, transcript, logical_form)")
    p.add_argument("--grammar", default=None, help="grammar JSON for validity (well-formedness only without it)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from conslu.grammar import GrammarError, load_grammar
    from conslu.metrics import ScoreError, format_table, read_jsonl, score

    try:
        refs = read_jsonl(args.ref, reference=True)
        hyps = read_jsonl(args.hyp, reference=False)
        grammar = load_grammar(args.grammar) if args.grammar else None
        result = score(refs, hyps, grammar)
    except (ScoreError, GrammarError) as e:
        return error(str(e))
    result["grammar"] = str(args.grammar) if args.grammar else None
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    print(format_table(result))
    print(f"(validity: {'well-formed and allowed by ' + str(args.grammar) if args.grammar else 'well-formed only, no --grammar'})")
    for what, verb in (("empty_references", "references have an empty logical form (not scored)"),
                       ("missing", "references have no hypothesis (scored as wrong)"),
                       ("ignored", "hypotheses have no reference (ignored)")):
        info = result[what]
        if info["count"]:
            more = ", ..." if info["count"] > len(info["ids"]) else ""
            print(f"conslu score: {info['count']} {verb}: {', '.join(info['ids'])}{more}", file=sys.stderr)
    return 0
