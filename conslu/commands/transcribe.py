"""``conslu transcribe FILES... [--model M]``: plain Whisper speech recognition (English, no timestamps).

Prints one JSON line ``{"file": ..., "text": ...}`` per readable file, in input order (the loop of
``conslu parse``, :func:`conslu.runner.run_files`, without resume or progress bar). Unreadable files
get one ``conslu: FILE: reason`` line on stderr and the others go on; the exit code is 1 when any
file failed (``conslu: N of M file(s) failed``) or the model cannot be loaded, 2 for a bad
``--batch-size``.
"""

from __future__ import annotations

import argparse
import sys

from conslu.commands._options import (add_batch_size_argument, add_debug_argument, add_device_argument,
                                      add_model_argument, quiet_transformers, usage_error)

NAME = "transcribe"
HELP = "plain Whisper speech recognition of audio files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+")
    add_model_argument(p, required=False)
    add_batch_size_argument(p)
    add_device_argument(p)
    add_debug_argument(p)


def run(args: argparse.Namespace) -> int:
    from conslu.pretrained import DEFAULT_MODEL, load_whisper
    from conslu.runner import Item, RunError, run_files
    from conslu.transcribe import transcribe

    if args.batch_size < 1:
        return usage_error(f"--batch-size must be >= 1, got {args.batch_size}")
    name = args.model or DEFAULT_MODEL

    def load():
        if not args.debug:
            quiet_transformers()
        try:
            return load_whisper(name, device=args.device)
        except Exception as e:  # noqa: BLE001 - one clear line; the traceback on --debug
            raise RunError(f"model {name}: {e}", code=1) from e

    def decode(whisper, audios):
        model, processor = whisper
        return [{"text": t} for t in transcribe(model, processor, audios, batch_size=len(audios))]

    items = [Item(path, path, {"file": path}) for path in args.files]
    res = run_files(items, load, decode, lambda oc: {**oc.item.meta, "text": oc.result["text"]},
                    batch_size=args.batch_size, debug=args.debug, progress=None)
    if res.code is not None:
        return res.code
    if res.failed:
        print(f"conslu: {res.failed} of {len(args.files)} file(s) failed", file=sys.stderr)
        return 1
    return 0
