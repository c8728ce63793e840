"""``conslu evaluate``: decode a STOP split (official or the synthetic corpus of ``conslu synth``)
and score it.

Predictions go to a JSON-lines file, one line per utterance in split order::

    {"id": ..., "file": ..., "domain": ..., "transcript": ..., "logical_form": ..., "valid": ..., "seconds": ...}

(``seconds``: the decode time of the line's batch divided by the batch size.) The file is
appended to and resumed like ``conslu parse --out``: ids already in it are not decoded again, every
line is flushed when computed, an incomplete last line left by a killed run is dropped and
recomputed, so after kill + rerun the file holds the same lines as an uninterrupted run (timing
aside). The settings that change predictions (model folder and weights, data folder, split, beam,
constraints) are recorded in ``PRED.jsonl.settings.json`` and a rerun with other settings refuses to
reuse the file. Default file: ``runs/eval/<model folder name>-<split>-<8 hex digits>.jsonl`` under
the current directory (the digits identify model path, data path, split, beam and constraints;
not inside the model folder, which ``save_pretrained`` replaces as a whole).

Scores (:func:`conslu.metrics.score`, validity against the model's grammar) cover the selected
utterances only (``--domains``/``--limit``). An utterance whose audio cannot be read gets one
``conslu: FILE: reason`` line, has no prediction and scores as wrong (``missing``); the run goes
on and exits with 1 and ``conslu: N of M utterances failed``. Exit 2: unusable data, model or
arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from conslu.jsonl import JSONLError
from conslu.parse import (DecodeError, Item, Reporter, SettingsMismatch, check_numbers, check_options, decode_settings,
                          decoding_options, load_model, open_output, report_decode_error, run_batches)

__all__ = ["default_output", "cmd_evaluate"]

EVAL_DIR = Path("runs") / "eval"


def default_output(model: str, data: str, split: str, decoding: dict) -> Path:
    """``runs/eval/<model name>-<split>-<hash>.jsonl``; the hash tells apart models/corpora of the same
    name and decoding settings (``decoding``: ``DecodingOptions.as_dict()`` less what does not change outputs)."""
    ident = json.dumps([str(Path(model).resolve()), str(Path(data).resolve()), split, decoding], sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    name = Path(model).resolve().name or "model"
    return EVAL_DIR / f"{name}-{split}-{digest}.jsonl"


_PART_SUFFIX = re.compile(r"_(train|eval|test|valid|dev)_\d+$")


def resolve_audio(path: str | None) -> str | None:
    """The STOP release quirk (stop-format.md): a ``<domain>_<split>_<part>`` folder in a file_id is
    really ``<domain>_<split>``; use that variant when the path as given does not exist."""
    if not path or os.path.exists(path):
        return path
    p = Path(path)
    variant = p.parent.with_name(_PART_SUFFIX.sub(r"_\1", p.parent.name)) / p.name
    return str(variant) if variant != p and variant.exists() else path


def _read_split(args: argparse.Namespace) -> list[dict]:
    from conslu.data import read_stop

    kwargs: dict[str, Any] = {"domains": args.domains or None, "limit": args.limit, "skip_bad": args.skip_bad}
    try:
        if "check_audio" in inspect.signature(read_stop).parameters:
            # a missing audio file is one failed utterance (reported, scored as wrong), not a fatal error
            kwargs["check_audio"] = False
    except (TypeError, ValueError):  # pragma: no cover
        pass
    skipped: list[str] = []
    try:
        if "skipped" in inspect.signature(read_stop).parameters:
            kwargs["skipped"] = skipped
    except (TypeError, ValueError):  # pragma: no cover
        pass
    ds = read_stop(args.data, args.split, **kwargs)
    for msg in skipped:  # --skip-bad: say what was left out (not scored)
        print(f"conslu: skipped {msg}", file=sys.stderr)
    if skipped:
        print(f"conslu: {len(skipped)} bad manifest row(s) skipped (not scored)", file=sys.stderr)
    rows = [dict(r) for r in ds]
    for r in rows:
        r["audio"] = resolve_audio(r.get("audio"))
    seen: set[str] = set()
    for r in rows:
        key = str(r["id"])
        if key in seen:
            raise ValueError(f"{args.data}: split {args.split!r} has the id {key!r} twice")
        seen.add(key)
    return rows


def _grammar(model: Any, model_dir: str) -> Any:
    if model is not None:
        return model.grammar
    from conslu.grammar import Grammar

    return Grammar.load(Path(model_dir) / "grammar.json")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``conslu evaluate --data STOP_DIR --split test --model DIR [--json] [--limit N] [--domains ...]
    [--out PRED.jsonl] [--beam N] [--unconstrained] [--no-speculative] [--batch-size B] [--skip-bad]``."""
    from conslu.metrics import format_table, score

    err = check_numbers(args)
    if err:
        print(f"conslu: {err}", file=sys.stderr)
        return 2
    try:
        rows = _read_split(args)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        if args.debug:
            traceback.print_exc()
        print(f"conslu: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"conslu: {args.data}: no utterances in split {args.split!r}"
              f"{' for domains ' + ', '.join(args.domains) if args.domains else ''}", file=sys.stderr)
        return 2
    settings = {**decode_settings(args), "data": str(Path(args.data).resolve()), "split": args.split}
    decoding = {k: v for k, v in settings.items() if k not in ("model", "model_fingerprint", "data", "split")}
    out = Path(args.out) if args.out else default_output(args.model, args.data, args.split, decoding)
    try:
        writer = open_output(out, lambda r: str(r["id"]), settings)
    except (JSONLError, SettingsMismatch, OSError) as e:
        print(f"conslu: {e}", file=sys.stderr)
        return 2
    model = None
    try:
        todo = [r for r in rows if str(r["id"]) not in writer.done]
        if len(todo) < len(rows):
            print(f"conslu: {out}: {len(rows) - len(todo)} of {len(rows)} predictions already there, reused",
                  file=sys.stderr)
        try:
            if todo:
                model = load_model(args.model, args.device, debug=args.debug)
            grammar = _grammar(model, args.model)
        except Exception as e:  # noqa: BLE001 - one clear line; the traceback on --debug
            if args.debug:
                traceback.print_exc()
            print(f"conslu: {e}" if str(args.model) in str(e) else f"conslu: model {args.model}: {e}", file=sys.stderr)
            return 2
        report = Reporter(len(todo), debug=args.debug, desc=f"evaluate {args.split}")
        outcomes: Any = ()
        items = [Item(str(r["id"]), r.get("audio") or None,
                      {"id": r["id"], "file": r.get("audio"), "domain": r.get("domain")},
                      error=None if r.get("audio") else f"{r['id']}: no audio file")
                 for r in todo]
        if todo:
            options = decoding_options(args)
            err = check_options(model, options)
            if err:
                print(f"conslu: {err}", file=sys.stderr)
                return 2
            outcomes = run_batches(model, items, batch_size=args.batch_size, options=options)
        try:
            for oc in outcomes:
                if oc.ok:
                    res = oc.result or {}
                    writer.write({**oc.item.meta, "transcript": res.get("transcript", ""),
                                  "logical_form": res.get("logical_form") or "", "valid": bool(res.get("valid")),
                                  "seconds": round(oc.seconds, 4)})
                report.outcome(oc)
        except DecodeError as e:
            report.close()
            return report_decode_error(e, args.debug, writer.written, out, "predictions")
        finally:
            report.close()
        wanted = {str(r["id"]) for r in rows}
        hyps = [h for h in writer.records if str(h["id"]) in wanted]
    finally:
        writer.close()

    refs = [{"id": r["id"], "domain": r.get("domain"), "transcript": r.get("transcript") or "",
             "logical_form": r.get("logical_form") or ""} for r in rows]
    try:
        result = score(refs, hyps, grammar)
    except ValueError as e:  # ScoreError: a malformed reference
        print(f"conslu: {args.data}: {e}", file=sys.stderr)
        return 2
    result["grammar"] = str(Path(args.model) / "grammar.json")
    result["predictions"] = str(out)
    result["failed"] = report.failed
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(format_table(result))
        print(f"(split {args.split} of {args.data}; predictions in {out}; validity against the model's grammar)")
    if result["missing"]["count"] != report.failed:
        print(f"conslu: {result['missing']['count']} of {len(rows)} utterances have no prediction "
              f"(scored as wrong)", file=sys.stderr)
    if report.failed:
        print(f"conslu: {report.failed} of {len(rows)} utterances failed", file=sys.stderr)
        return 1
    return 0
