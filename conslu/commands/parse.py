"""``conslu parse FILES... --model DIR``: transcribe and parse audio files with a ConSLU model.

Output: one JSON line per parsed file, in input order, on stdout or appended to ``--out``::

    {"file": "a.wav", "transcript": "...", "logical_form": "[IN:...]", "valid": true, "seconds": 0.21}

``valid``: the logical form is a well-formed tree allowed by the model's grammar. ``seconds``: the
decode time of the file's batch divided by the batch size (wall-clock, model only; audio loading
runs in a background thread while the previous batch decodes and is not counted).

Behaviour (the loop is :func:`conslu.runner.run_files`):

* Files are decoded ``--batch-size`` at a time; the next batches' audio is loaded in a background
  thread meanwhile. A progress bar (stderr) is shown for more than a few files.
* A file that cannot be read (missing, empty, not audio, a directory, longer than 30 s) gets one
  line ``conslu: FILE: reason`` on stderr (a traceback too with ``--debug``) and the others go on;
  the exit code is then 1 and the last line says ``conslu: N of M files failed``. Directories are
  not expanded (a folder can hold anything; pass ``DIR/*.wav``). A file named twice is parsed once.
* ``--out PRED.jsonl`` appends and skips files already in it, so a killed or failed run is resumed
  by running the same command again; every line is flushed as soon as it is computed. A run killed
  mid-line leaves an incomplete last line, which the next run drops and recomputes. Failed files
  are not written, so a rerun retries them. The settings that change the output (model folder and
  its weights, beam, constraints, max new tokens) are kept in ``PRED.jsonl.settings.json``; a rerun
  with other settings refuses to mix its results into the same file.
* Exit codes: 0 all parsed, 1 some files failed (or decoding itself failed), 2 unusable arguments,
  model or output file.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from conslu.commands._options import (add_batch_size_argument, add_debug_argument, add_decoding_arguments,
                                      add_device_argument, add_dtype_argument, add_model_argument, decoding_error, slu_loader,
                                      usage_error)

NAME = "parse"
HELP = "transcribe and parse audio files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+")
    add_model_argument(p)
    add_decoding_arguments(p)
    add_batch_size_argument(p)
    p.add_argument("--out", default=None, help="write JSON lines here (appends, skips files already done)")
    add_device_argument(p)
    add_dtype_argument(p)
    add_debug_argument(p)


def run(args: argparse.Namespace) -> int:
    from conslu import parse
    from conslu.runner import run_files

    err = decoding_error(args)
    if err:
        return usage_error(err)
    items = parse.file_items(args.files)
    load, options = slu_loader(args)
    res = run_files(items, load, partial(parse.decode, options=options), parse.record, prepare=parse.features,
                    batch_size=args.batch_size, out=args.out, key=lambda r: parse.file_key(str(r["file"])),
                    settings=parse.decode_settings(args.model, options, args.audio_context, args.dtype) if args.out else None,
                    debug=args.debug, progress="parse", resumed="files already done, skipped", noun="results")
    if res.code is not None:
        return res.code
    if not res.todo:
        return 0
    if args.out:
        print(f"conslu: wrote {res.written} results to {args.out}", file=sys.stderr)
    if res.failed:
        print(f"conslu: {res.failed} of {len(items)} files failed", file=sys.stderr)
        return 1
    return 0
