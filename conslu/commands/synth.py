"""``conslu synth FILES... --out DIR``: speak TOPv2/STOP text with espeak-ng into a corpus with STOP's
exact layout (:func:`conslu.synth.read_inputs` + :func:`conslu.synth.synthesize`; resumable).
Exit 1 when the inputs or the synthesis fail, 2 for unusable options."""

from __future__ import annotations

import argparse
import sys

NAME = "synth"
HELP = "speak TOPv2/STOP text with espeak-ng into a STOP-layout corpus"


def _snr(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number of dB or none") from None


def _levels(values: list | None) -> "float | list | None":
    """One level as a number (the corpus settings of before), several as a list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="TOPv2 .tsv files (split from names like weather_eval.tsv) or STOP manifests")
    p.add_argument("--out", required=True, help="corpus folder (STOP layout)")
    p.add_argument("--splits", nargs="*", default=None, help="keep only these splits (train, eval, test)")
    p.add_argument("--domains", nargs="*", default=None, help="keep only these domains")
    p.add_argument("--limit", type=int, default=None, help="at most this many utterances per split")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-snr", type=_snr, nargs="+", default=None, metavar="DB",
                   help="add white noise at this SNR in dB; several values (none: clean) are drawn per utterance")
    p.add_argument("--voices", nargs="*", default=None, help="espeak-ng voices to draw from")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (reported) instead of failing")


def run(args: argparse.Namespace) -> int:
    from conslu import synth
    from conslu.data import DataError
    from conslu.logical_form import MalformedTreeError

    splits = args.splits or None
    if splits:
        unknown = [s for s in splits if s not in synth.SPLITS]
        if unknown:
            print(f"conslu synth: unknown split(s) {', '.join(unknown)} (choose from {', '.join(synth.SPLITS)})",
                  file=sys.stderr)
            return 2
    if args.limit is not None and args.limit < 0:
        print("conslu synth: --limit must be >= 0", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("conslu synth: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        report: list[str] = []
        utts = synth.read_inputs(args.files, splits=splits, domains=args.domains, skip_bad=args.skip_bad, report=report)
        if not utts:
            print("conslu synth: no utterances left after filtering (check --splits/--domains and the inputs)",
                  file=sys.stderr)
            return 1
        res = synth.synthesize(utts, args.out, seed=args.seed, voices=args.voices, noise_snr=_levels(args.noise_snr),
                               jobs=args.jobs, limit=args.limit, skip_bad=args.skip_bad, progress=True,
                               bad_rows=report)
    except (synth.SynthError, DataError, MalformedTreeError, FileNotFoundError, IsADirectoryError) as e:
        print(f"conslu synth: {e}", file=sys.stderr)
        return 1
    for msg in res.bad_rows:
        print(f"skipped: {msg}", file=sys.stderr)
    per = res.wall_seconds / res.written if res.written else 0.0
    print(f"conslu synth: {res.written} wav(s) written, {res.skipped} already done, {len(res.bad_rows)} bad row(s) "
          f"skipped; {res.seconds_audio:.1f} s of audio in {res.wall_seconds:.1f} s"
          + (f" ({per * 1000:.0f} ms per utterance)" if res.written else "") + f"; manifests: {', '.join(res.manifests)}",
          file=sys.stderr)
    return 0
