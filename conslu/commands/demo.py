"""``conslu demo [--workdir runs/demo] [--quick] [--seed S]``: the end-to-end CPU demo (:mod:`conslu.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "demo"
HELP = "end-to-end CPU demo on embedded data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its table; known input problems end with one line and exit code 1."""
    from conslu import demo
    from conslu.audio import AudioError
    from conslu.data import DataError
    from conslu.model import ModelFolderError
    from conslu.pretrained import ModelNotAvailable
    from conslu.synth import SynthError

    workdir = Path(args.workdir)
    settings = demo.QUICK if args.quick else demo.FULL
    if args.quick:
        workdir = workdir / "quick"
    try:
        summary = demo.run_demo(workdir, settings, seed=int(args.seed))
    except (SynthError, DataError, ModelNotAvailable, ModelFolderError, FileNotFoundError, AudioError) as e:
        print(f"conslu demo: {e}", file=sys.stderr)  # tracebacks only for bugs
        return 1
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from conslu.demo import format_results

    res = s["results"]
    st = s["settings"]
    what = "decoder" if st.get("freeze_encoder") else "whole model"
    print(f"\nConSLU demo: {st.get('model', 'whisper-tiny.en')}, {what} fine-tuned on {s['n_train']} espeak-ng "
          f"utterances ({s['train'].get('steps')} steps), eval on {s['n_eval']} (same voices and noise) and "
          f"{s.get('n_unseen', '-')} (other voices, noise)")
    print(format_results([(k, v) for k, v in res.items()]))
    print("(unconstrained = the same model decoded without the grammar. The constrained loss normalises the\n"
          " tree tokens over the allowed candidates only, so nothing ranks them against the whole vocabulary:\n"
          " the two belong together. recipes/ablation compares against a model trained with the plain loss.)")
    sm = s["sample"]
    print(f"\nnew utterance {sm['wav']}: said {sm['text']!r}")
    print(f"  expected      {sm['expected']}")
    for k in ("constrained", "unconstrained"):
        p = sm[k]
        print(f"  {k:<13} {p['transcript']!r} | {p['logical_form'] or '(no tree)'}  [{'valid' if p['valid'] else 'invalid'}]")
    t = s["timings"]
    print("\ntimings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    print(f"try it: conslu parse {sm['wav']} --model {s['model']}")
