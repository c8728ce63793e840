"""``conslu evaluate --data STOP_DIR --split test --model DIR``: decode a STOP split (official or the
synthetic corpus of ``conslu synth``) and score it.

Predictions go to a JSON-lines file, one line per utterance in split order::

    {"id": ..., "file": ..., "domain": ..., "transcript": ..., "logical_form": ..., "valid": ..., "seconds": ...}

(``seconds``: the decode time of the line's batch divided by the batch size.) The file is
appended to and resumed like ``conslu parse --out`` (the same loop, :func:`conslu.runner.run_files`):
ids already in it are not decoded again, every line is flushed when computed, an incomplete last
line left by a killed run is dropped and recomputed, so after kill + rerun the file holds the same
lines as an uninterrupted run (timing aside). The settings that change predictions (model folder
and weights, data folder, split, beam, constraints) are recorded in ``PRED.jsonl.settings.json``
and a rerun with other settings refuses to reuse the file. Default file:
``runs/eval/<model folder name>-<split>-<8 hex digits>.jsonl`` under the current directory (the
digits identify model path, data path, split, beam and constraints; not inside the model folder,
which ``save_pretrained`` replaces as a whole).

``--devices N`` shards the split over N processes (``--accelerator cuda``: one per GPU; on a CPU
machine, processes sharing the cores); the predictions are gathered into the same file, equal to a
one-process run's (:func:`conslu.runner.run_files`). ``--dtype bfloat16|float16``: half-precision
inference where the device supports it.

Scores (:func:`conslu.metrics.score`, validity against the model's grammar) cover the selected
utterances only (``--domains``/``--limit``), one per recording (eval and test have two parts,
``*_0`` and ``*_1``), overall and per domain. Rows whose reference tree is empty or ``nan`` are left
out with one line giving their count and first ids (also under ``notes`` in ``--json``). An utterance whose audio cannot be read gets one
``conslu: FILE: reason`` line, has no prediction and scores as wrong (``missing``); the run goes
on and exits with 1 and ``conslu: N of M utterances failed``. Exit 2: unusable data, model or
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from functools import partial
from pathlib import Path

from conslu.commands._options import (add_batch_size_argument, add_debug_argument, add_decoding_arguments,
                                      add_device_argument, add_dtype_argument, add_model_argument, decoding_error, slu_loader,
                                      usage_error)

NAME = "evaluate"
HELP = "decode a STOP split and score it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="STOP root folder (official or synthetic)")
    p.add_argument("--split", default="test")
    add_model_argument(p)
    add_decoding_arguments(p)
    add_batch_size_argument(p)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--domains", nargs="*", default=None)
    p.add_argument("--out", default=None, help="predictions JSONL, appended and resumed (default: runs/eval/<model-name>-<split>-<hash>.jsonl)")
    add_device_argument(p)
    add_dtype_argument(p)
    p.add_argument("--devices", type=int, default=1,
                   help="shard the split over N processes (one per GPU with --accelerator cuda); the predictions "
                        "file equals a one-process run's")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes that read audio and compute log-mels ahead of decoding (0: one thread)")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"),
                   help="with --devices N: the processes' device type (default: cuda when available)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-bad", action="store_true")
    add_debug_argument(p)


def _fail(args: argparse.Namespace, message: str) -> int:
    if args.debug:
        traceback.print_exc()
    return usage_error(message)


def run(args: argparse.Namespace) -> int:
    from conslu import evaluate, parse
    from conslu.metrics import format_table, score
    from conslu.runner import run_files

    err = decoding_error(args)
    if not err and args.limit is not None and args.limit < 0:
        err = f"--limit must be >= 0, got {args.limit}"
    if not err and args.workers < 0:
        err = f"--workers must be >= 0, got {args.workers}"
    if not err and args.devices < 1:
        err = f"--devices must be >= 1, got {args.devices}"
    if not err and args.devices > 1 and args.device is not None:
        err = "--device names one device; with --devices N use --accelerator cpu|cuda"
    if err:
        return usage_error(err)
    notes: list[str] = []
    try:
        rows = evaluate.read_split(args.data, args.split, domains=args.domains, limit=args.limit,
                                   skip_bad=args.skip_bad, warn=lambda msg: print(msg, file=sys.stderr), notes=notes)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        return _fail(args, str(e))
    if not rows:
        return usage_error(f"{args.data}: no utterances in split {args.split!r}"
                           f"{' for domains ' + ', '.join(args.domains) if args.domains else ''}")
    load, options = slu_loader(args)
    settings = {**parse.decode_settings(args.model, options, args.audio_context, args.dtype), "data": str(Path(args.data).resolve()), "split": args.split}
    decoding = {k: v for k, v in settings.items() if k not in ("model", "model_fingerprint", "data", "split")}
    out = Path(args.out) if args.out else evaluate.default_output(args.model, args.data, args.split, decoding)
    res = run_files(evaluate.items(rows), load, partial(parse.decode, options=options),
                    parse.record, batch_size=args.batch_size, out=out, key=lambda r: str(r["id"]), settings=settings,
                    debug=args.debug, progress=f"evaluate {args.split}", resumed="predictions already there, reused",
                    noun="predictions", devices=args.devices, accelerator=args.accelerator, prepare=parse.features,
                    workers=args.workers)
    if res.code is not None:
        return res.code
    if res.model is not None:
        grammar = res.model.grammar
    else:  # nothing left to decode: the model folder's grammar, without loading the model
        from conslu.grammar import Grammar

        try:
            grammar = Grammar.load(Path(args.model) / "grammar.json")
        except Exception as e:  # noqa: BLE001 - one clear line; the traceback on --debug
            return _fail(args, parse.model_error(args.model, e))
    wanted = {str(r["id"]) for r in rows}
    hyps = [h for h in res.records if str(h["id"]) in wanted]
    try:
        result = score(evaluate.references(rows), hyps, grammar)
    except ValueError as e:  # ScoreError: a malformed reference
        return usage_error(f"{args.data}: {e}")
    result["grammar"] = str(Path(args.model) / "grammar.json")
    result["predictions"] = str(out)
    result["failed"] = res.failed
    result["notes"] = notes  # rows left out before decoding (empty references) and missing part folders
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(format_table(result))
        print(f"(split {args.split} of {args.data}; predictions in {out}; validity against the model's grammar)")
    if result["missing"]["count"] != res.failed:
        print(f"conslu: {result['missing']['count']} of {len(rows)} utterances have no prediction "
              f"(scored as wrong)", file=sys.stderr)
    if res.failed:
        print(f"conslu: {res.failed} of {len(rows)} utterances failed", file=sys.stderr)
        return 1
    return 0
