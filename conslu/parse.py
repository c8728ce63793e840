"""``conslu parse FILES...``: transcribe and parse audio files with a ConSLU model.

Output: one JSON line per parsed file, in input order, on stdout or appended to ``--out``::

    {"file": "a.wav", "transcript": "...", "logical_form": "[IN:...]", "valid": true, "seconds": 0.21}

``valid``: the logical form is a well-formed tree allowed by the model's grammar. ``seconds``: the
decode time of the file's batch divided by the batch size (wall-clock, model only; audio loading
runs in a background thread while the previous batch decodes and is not counted).

Behaviour:

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

:func:`run_batches` is the reusable batched runner (also used by ``conslu evaluate``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from conslu.decoding import DecodingOptions
from conslu.jsonl import JSONLError, ResumableWriter, atomic_write_json, dumps

__all__ = ["Item", "Outcome", "DecodeError", "report_decode_error", "run_batches", "parse_kwargs", "load_model", "model_fingerprint",
           "open_output", "Reporter", "cmd_parse"]

PROGRESS_MIN_FILES = 5  # show a progress bar from this many files on
PREFETCH_BATCHES = 2


@dataclass
class Item:
    """One input: ``key`` identifies it in the output (file path or utterance id), ``path`` is the
    audio file (None: known to be missing, ``error`` says why), ``meta`` goes into its record."""

    key: str
    path: str | None
    meta: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Outcome:
    """The result for one item: ``result`` (ConSLU.parse dict) or ``error`` (one line, ``trace`` for --debug)."""

    item: Item
    result: dict | None = None
    seconds: float = 0.0
    error: str | None = None
    trace: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DecodeError(RuntimeError):
    """The model failed on a batch (not a bad input file): the run stops; results so far are kept."""


def report_decode_error(e: DecodeError, debug: bool, written: int | None, out: Any, what: str) -> int:
    """Report a decoding failure on stderr (with the traceback under ``--debug``) and what was kept;
    returns the exit code 1."""
    if debug:
        traceback.print_exception(e.__cause__ or e)
    print(f"conslu: {e}", file=sys.stderr)
    if written is not None:
        print(f"conslu: {written} {what} written to {out}; run again to resume", file=sys.stderr)
    return 1


def _default_loader(path: str) -> np.ndarray:
    from conslu.audio import load_audio

    return load_audio(path)


def _load_one(item: Item, loader: Callable[[str], np.ndarray]) -> tuple[np.ndarray | None, str | None, str | None]:
    """(audio, error line, traceback) for one item; never raises for a bad file."""
    if item.error is not None:
        return None, item.error, None
    path = item.path
    if path is None:
        return None, f"{item.key}: no audio file", None
    if os.path.isdir(path):
        return None, f"{path}: is a directory (give the audio files, e.g. {path.rstrip('/')}/*.wav)", None
    try:
        audio = loader(path)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run
        from conslu.audio import AudioError

        msg = str(e) if isinstance(e, AudioError) else f"{path}: {type(e).__name__}: {e}"
        return None, msg, traceback.format_exc()
    if audio is None or np.asarray(audio).size == 0:
        return None, f"{path}: no audio samples", None
    return audio, None, None


def run_batches(model: Any, items: Iterable[Item], *, batch_size: int = 8,
                options: DecodingOptions | None = None,
                loader: Callable[[str], np.ndarray] | None = None,
                prefetch: int = PREFETCH_BATCHES) -> Iterator[Outcome]:
    """Parse ``items`` in batches of readable audio; yields one :class:`Outcome` per item, in order.

    Audio for the next ``prefetch`` batches is loaded in a background thread while the model
    decodes. Unreadable files yield error outcomes; an exception from ``model.parse`` raises
    :class:`DecodeError` (the outcomes of earlier batches have been yielded already).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    load = loader or _default_loader
    options = options or DecodingOptions()
    source = iter(items)

    def next_chunk() -> list[Item]:
        chunk: list[Item] = []
        for item in source:
            chunk.append(item)
            if len(chunk) == batch_size:
                break
        return chunk

    def load_chunk(chunk: list[Item]) -> list[tuple[Item, tuple]]:
        return [(item, _load_one(item, load)) for item in chunk]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conslu-audio") as pool:
        pending: deque[Future] = deque()

        def submit() -> None:
            chunk = next_chunk()
            if chunk:
                pending.append(pool.submit(load_chunk, chunk))

        for _ in range(max(1, prefetch)):
            submit()
        try:
            while pending:
                loaded = pending.popleft().result()
                submit()
                good = [(item, audio) for item, (audio, err, _) in loaded if err is None]
                results: list[dict] = []
                per_file = 0.0
                if good:
                    t0 = time.perf_counter()
                    try:
                        results = list(model.parse([a for _, a in good], options))
                    except Exception as e:
                        first = good[0][0]
                        raise DecodeError(f"decoding failed on the batch starting at {first.path or first.key}: "
                                          f"{type(e).__name__}: {e}") from e
                    if len(results) != len(good):
                        raise DecodeError(f"the model returned {len(results)} results for {len(good)} inputs")
                    per_file = (time.perf_counter() - t0) / len(good)
                by_item = {id(item): res for (item, _), res in zip(good, results)}
                for item, (_, err, trace) in loaded:
                    if err is not None:
                        yield Outcome(item, error=err, trace=trace)
                    else:
                        yield Outcome(item, result=by_item[id(item)], seconds=per_file)
        finally:
            for fut in pending:
                fut.cancel()


# ----------------------------------------------------------------------------------------------
# Shared by parse and evaluate: model loading, output settings, progress/error reporting


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def load_model(path: str, device: str | None = None, *, debug: bool = False) -> Any:
    """``ConSLU.from_pretrained(path)`` on ``device`` (default: CUDA when available, else CPU)."""
    import torch

    from conslu.model import ConSLU

    if not debug:
        _quiet_transformers()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ConSLU.from_pretrained(path)
    to = getattr(model, "to", None)
    if callable(to):
        model = to(device) or model
    return model


FINGERPRINT_FILES = ("conslu.json", "grammar.json", "generation_config.json", "tokenizer.json")
FINGERPRINT_BYTES = 1 << 20


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a model folder's content: sha256 over each weights/config file's name,
    size and first and last MiB (so a retrained model in the same folder differs, and copying the
    folder elsewhere does not)."""
    folder = Path(path)
    h = hashlib.sha256()
    if not folder.is_dir():
        return ""
    names = sorted({p.name for p in folder.glob("*.safetensors")} | {n for n in FINGERPRINT_FILES if (folder / n).is_file()})
    for name in names:
        f = folder / name
        size = f.stat().st_size
        h.update(f"{name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                fh.seek(size - FINGERPRINT_BYTES)
                h.update(fh.read(FINGERPRINT_BYTES))
            elif size > FINGERPRINT_BYTES:
                h.update(fh.read())
    return h.hexdigest()[:16]


def settings_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".settings.json")


class SettingsMismatch(ValueError):
    pass


def open_output(out: str | os.PathLike, key: Callable[[dict], str], settings: dict, *,
                warn: Callable[[str], None] | None = None) -> ResumableWriter:
    """A :class:`ResumableWriter` on ``out`` whose existing records were made with ``settings``
    (recorded beside it in ``OUT.settings.json``); raises :class:`SettingsMismatch` otherwise."""
    writer = ResumableWriter(out, key, warn=warn)
    try:
        side = settings_path(out)
        if writer.records and side.is_file():
            try:
                old = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict):
                diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
                if diff:
                    raise SettingsMismatch(
                        f"{out}: holds {len(writer.records)} results made with other settings ({'; '.join(diff)}); "
                        f"delete it or choose another output file")
        atomic_write_json(side, settings)
    except BaseException:
        writer.close()
        raise
    return writer


class Reporter:
    """Progress bar (tqdm on stderr, from ``PROGRESS_MIN_FILES`` files) and error lines that do not
    break it."""

    def __init__(self, total: int, *, debug: bool = False, desc: str = "parse") -> None:
        self.debug = debug
        self.failed = 0
        self.bar = None
        if total >= PROGRESS_MIN_FILES:
            from tqdm import tqdm

            tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            self.bar = tqdm(total=total, unit="file", desc=desc, file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5 if tty else 30.0, leave=tty)

    def line(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def outcome(self, oc: Outcome) -> None:
        if not oc.ok:
            self.failed += 1
            if self.debug and oc.trace:
                self.line(oc.trace.rstrip())
            self.line(f"conslu: {oc.error}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """``DecodingOptions`` from the decoding flags (``cli._add_decode_args``)."""
    return DecodingOptions(beam_size=args.beam, constrained=False if args.unconstrained else None,
                           speculative=not args.no_speculative, max_new_tokens=args.max_new_tokens,
                           length_penalty=args.length_penalty, language=args.language,
                           loop_guard=not args.no_loop_guard)


def check_options(model: Any, options: DecodingOptions) -> str | None:
    """A usage error when the options do not suit the model (length budget, language), else None."""
    try:
        model.check(options)
    except ValueError as e:
        return str(e)
    return None


def check_numbers(args: argparse.Namespace) -> str | None:
    """A usage error for out-of-range numeric options, else None."""
    if getattr(args, "batch_size", 1) < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if getattr(args, "beam", 1) < 1:
        return f"--beam must be >= 1, got {args.beam}"
    mnt = getattr(args, "max_new_tokens", None)
    if mnt is not None and mnt < 1:
        return f"--max-new-tokens must be >= 1, got {mnt}"
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 0:
        return f"--limit must be >= 0, got {limit}"
    return None


def decode_settings(args: argparse.Namespace) -> dict:
    """Settings that change a model's output, recorded beside resumable outputs."""
    opts = decoding_options(args).as_dict()
    opts.pop("speculative")  # same output either way
    return {"model": str(Path(args.model).resolve()), "model_fingerprint": model_fingerprint(args.model), **opts}


def _norm_file(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _unique(files: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        k = _norm_file(f)
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


def cmd_parse(args: argparse.Namespace) -> int:
    """``conslu parse FILES... --model DIR [--beam N] [--unconstrained] [--no-speculative]
    [--batch-size B] [--max-new-tokens N] [--out PRED.jsonl] [--device D] [--debug]``."""
    err = check_numbers(args)
    if err:
        print(f"conslu: {err}", file=sys.stderr)
        return 2
    files = _unique(args.files)
    writer: ResumableWriter | None = None
    try:
        if args.out:
            try:
                writer = open_output(args.out, lambda r: _norm_file(str(r["file"])), decode_settings(args))
            except (JSONLError, SettingsMismatch, OSError) as e:
                print(f"conslu: {e}", file=sys.stderr)
                return 2
        todo = [f for f in files if writer is None or _norm_file(f) not in writer.done]
        if writer is not None and len(todo) < len(files):
            print(f"conslu: {args.out}: {len(files) - len(todo)} of {len(files)} files already done, skipped",
                  file=sys.stderr)
        if not todo:
            return 0
        try:
            model = load_model(args.model, args.device, debug=args.debug)
        except Exception as e:  # noqa: BLE001 - one clear line; the traceback on --debug
            if args.debug:
                traceback.print_exc()
            print(f"conslu: model {args.model}: {e}" if str(args.model) not in str(e) else f"conslu: {e}",
                  file=sys.stderr)
            return 2
        options = decoding_options(args)
        err = check_options(model, options)
        if err:
            print(f"conslu: {err}", file=sys.stderr)
            return 2
        report = Reporter(len(todo), debug=args.debug)
        try:
            for oc in run_batches(model, [Item(f, f) for f in todo], batch_size=args.batch_size, options=options):
                if oc.ok:
                    res = oc.result or {}
                    rec = {"file": oc.item.key, "transcript": res.get("transcript", ""),
                           "logical_form": res.get("logical_form") or "", "valid": bool(res.get("valid")),
                           "seconds": round(oc.seconds, 4)}
                    if writer is not None:
                        writer.write(rec)
                    else:
                        print(dumps(rec), flush=True)
                report.outcome(oc)
        except DecodeError as e:
            report.close()
            return report_decode_error(e, args.debug, None if writer is None else writer.written, args.out, "results")
        finally:
            report.close()
        if writer is not None:
            print(f"conslu: wrote {writer.written} results to {args.out}", file=sys.stderr)
        if report.failed:
            print(f"conslu: {report.failed} of {len(files)} files failed", file=sys.stderr)
            return 1
        return 0
    finally:
        if writer is not None:
            writer.close()
