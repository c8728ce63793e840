"""Flags shared by several commands, defined once, and what they turn into.

* ``--model``, ``--batch-size``, ``--device``, ``--debug``: parse, evaluate, transcribe (``--model``
  also init and bench).
* The decoding flags of parse and evaluate (:func:`add_decoding_arguments`), the fields of
  :class:`conslu.decoding.DecodingOptions` (:func:`decoding_options`).
* :func:`slu_loader`: the ConSLU model of ``--model``/``--device`` for :func:`conslu.runner.run_files`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from conslu.decoding import DecodingOptions

__all__ = ["add_model_argument", "add_batch_size_argument", "add_device_argument", "add_dtype_argument",
           "add_debug_argument",
           "add_decoding_arguments", "decoding_options", "decoding_error", "slu_loader", "error", "usage_error",
           "quiet_transformers", "audio_context_value"]


def add_model_argument(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="ConSLU/Whisper folder, hub id, or a short name such as whisper-tiny.en")


def add_batch_size_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations at inference (bfloat16/float16: where the device supports them)")


def add_debug_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="print tracebacks for failed files and errors")


def _penalty(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def audio_context_value(value: str) -> float | None:
    """``window`` -> None (Whisper's 30 s); else a context bucket in seconds (argparse type)."""
    if value == "window":
        return None
    from conslu.context import check_bucket

    try:
        return check_bucket(float(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}" if "bucket" in str(e) else
                                         f"{value!r}: expected window or seconds") from None


def _context(value: str) -> float | None | str:
    return value if value == "model" else audio_context_value(value)


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags of ``parse`` and ``evaluate`` (``conslu.decoding.DecodingOptions``)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    g.add_argument("--unconstrained", action="store_true", help="decode without the grammar and copy constraints")
    g.add_argument("--no-speculative", action="store_true", help="greedy without copy-speculative drafts (same output)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens after the prompt, <|endoftext|> included (default 256)")
    g.add_argument("--length-penalty", type=_penalty, default=0.0,
                   help="beam ranking: 0 (default) = the sum of log-probs; none = log-prob / length (Whisper's); "
                        "else over ((5 + length) / 6) ** penalty")
    g.add_argument("--language", default=None, help="prompt language of a multilingual Whisper (default: en)")
    g.add_argument("--no-loop-guard", action="store_true", help="let looping transcripts run to the length limit")
    g.add_argument("--audio-context", type=_context, default="model", metavar="{model,window,SECONDS}",
                   help="what the encoder reads: model (the folder's setting, default), window (Whisper's 30 s), "
                        "or the audio's length rounded up to SECONDS")


def decoding_options(args: argparse.Namespace) -> "DecodingOptions":
    """``DecodingOptions`` from the flags of :func:`add_decoding_arguments`."""
    from conslu.decoding import DecodingOptions

    return DecodingOptions(beam_size=args.beam, constrained=False if args.unconstrained else None,
                           speculative=not args.no_speculative, max_new_tokens=args.max_new_tokens,
                           length_penalty=args.length_penalty, language=args.language,
                           loop_guard=not args.no_loop_guard)


def decoding_error(args: argparse.Namespace) -> str | None:
    """A usage error for an out-of-range ``--batch-size``, ``--beam`` or ``--max-new-tokens``, else None."""
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.beam < 1:
        return f"--beam must be >= 1, got {args.beam}"
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    return None


def error(message: str) -> int:
    """``conslu: error: MESSAGE`` on stderr (the form of grammar and score); the exit code 2."""
    print(f"conslu: error: {message}", file=sys.stderr)
    return 2


def usage_error(message: str) -> int:
    """``conslu: MESSAGE`` on stderr; the exit code 2."""
    print(f"conslu: {message}", file=sys.stderr)
    return 2


def quiet_transformers() -> None:
    """No transformers warnings or progress bars (generate() chatter is not for users; --debug keeps them)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def slu_loader(args: argparse.Namespace) -> tuple[Callable[[], Any], "DecodingOptions"]:
    """(load, options) for parse and evaluate: ``load()`` (a picklable :class:`conslu.parse.Loader`)
    loads the ConSLU folder of ``--model`` on ``--device`` in ``--dtype`` and checks that the
    decoding options suit it; it raises :class:`conslu.runner.RunError` (exit 2) with one line
    otherwise."""
    from conslu.parse import Loader

    options = decoding_options(args)
    return Loader(args.model, options, args.device, args.audio_context, getattr(args, "dtype", "float32"),
                  args.debug), options
