"""The batched, resumable, error-reporting file loop of ``conslu parse``, ``evaluate`` and ``transcribe``.

:func:`run_files` is the whole loop; the commands differ only in their items, their model and
how a result becomes a record:

* Items (:class:`Item`) are decoded ``batch_size`` at a time; the next batches' audio is loaded in
  a background thread meanwhile (:func:`run_batches`). A progress bar (stderr, tqdm) is shown from
  ``PROGRESS_MIN_FILES`` items on when the caller names one.
* An item that cannot be read (missing, empty, not audio, longer than 30 s, or known bad:
  ``Item.error``) gets one line ``conslu: FILE: reason`` on stderr (its traceback first under
  ``debug``) and the others go on; :class:`RunResult` counts them in ``failed``.
* Records go to stdout as JSON lines, or to a resumable JSON-lines file (``out``): records whose
  key is already in it are skipped (the model is not even loaded when nothing is left), every line
  is flushed when computed, an incomplete last line left by a killed run is dropped and
  recomputed. The settings that change the output are kept in ``OUT.settings.json``; a rerun with
  other settings refuses to mix its results into the same file (:func:`open_output`).
* A model that fails on a batch (not a bad input) stops the run: ``conslu: decoding failed ...``,
  what was written so far is kept, exit code 1. A model that cannot be loaded or does not suit the
  options stops it before any item (:class:`RunError`, with its exit code).

Nothing here knows argparse or a particular model: the caller passes a ``load`` function (called
only when there is something to decode) and a ``decode(model, audios) -> [dict, ...]`` function.
"""

from __future__ import annotations

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

from conslu.jsonl import JSONLError, ResumableWriter, atomic_write_json, dumps

__all__ = ["Item", "Outcome", "DecodeError", "RunError", "RunResult", "SettingsMismatch", "Reporter",
           "run_batches", "run_files", "open_output", "settings_path", "report_decode_error"]

PROGRESS_MIN_FILES = 5  # show a progress bar from this many items on
PREFETCH_BATCHES = 2

BatchFn = Callable[[list[np.ndarray]], Sequence[dict]]


@dataclass
class Item:
    """One input: ``key`` identifies it in the output (resumed outputs skip keys already there),
    ``path`` is the audio file (None: known to be missing, ``error`` says why), ``meta`` goes into
    its record, ``error``: known to be unusable (one line, reported like an unreadable file)."""

    key: str
    path: str | None
    meta: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Outcome:
    """The result for one item: ``result`` (a dict from the decode function) or ``error`` (one
    line, ``trace`` for --debug); ``seconds``: the batch's decode time divided by its size."""

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


class RunError(Exception):
    """The run cannot start (model not loadable, options unsuitable): ``conslu: MESSAGE`` on stderr
    (the cause's traceback too under ``debug``) and exit ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------
# Loading and decoding in batches


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
    try:
        audio = loader(path)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run
        from conslu.audio import AudioError

        msg = str(e) if isinstance(e, AudioError) else f"{path}: {type(e).__name__}: {e}"
        return None, msg, traceback.format_exc()
    if audio is None or np.asarray(audio).size == 0:
        return None, f"{path}: no audio samples", None
    return audio, None, None


def run_batches(decode: BatchFn, items: Iterable[Item], *, batch_size: int = 8,
                loader: Callable[[str], np.ndarray] | None = None,
                prefetch: int = PREFETCH_BATCHES) -> Iterator[Outcome]:
    """Decode ``items`` in batches of readable audio; yields one :class:`Outcome` per item, in order.

    ``decode(audios)`` returns one dict per audio. Audio for the next ``prefetch`` batches is
    loaded in a background thread while the model decodes. Unreadable files yield error outcomes;
    an exception from ``decode`` raises :class:`DecodeError` (the outcomes of earlier batches have
    been yielded already).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    load = loader or _default_loader
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
                        results = list(decode([a for _, a in good]))
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
# Resumable output, progress and error reporting


def settings_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".settings.json")


class SettingsMismatch(ValueError):
    """The output file holds results made with other settings."""


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
    """Progress bar (tqdm on stderr, from ``PROGRESS_MIN_FILES`` items, when ``desc`` names one) and
    error lines that do not break it."""

    def __init__(self, total: int, *, debug: bool = False, desc: str | None = "parse") -> None:
        self.debug = debug
        self.failed = 0
        self.bar = None
        if desc is not None and total >= PROGRESS_MIN_FILES:
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


def report_decode_error(e: DecodeError, debug: bool, written: int | None, out: Any, what: str) -> int:
    """Report a decoding failure on stderr (with the traceback under ``debug``) and what was kept;
    returns the exit code 1."""
    if debug:
        traceback.print_exception(e.__cause__ or e)
    print(f"conslu: {e}", file=sys.stderr)
    if written is not None:
        print(f"conslu: {written} {what} written to {out}; run again to resume", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------
# The whole loop


@dataclass
class RunResult:
    """What :func:`run_files` did. ``code``: the run stopped early with this exit code (the reason
    is reported already); None: it went through. ``todo``: items left to decode at the start (not
    in ``out`` yet); ``failed``: items that could not be read; ``written``: records written this
    run; ``records``: every record of ``out`` (resumed ones first), or those printed this run;
    ``model``: what ``load`` returned (None when nothing was decoded)."""

    code: int | None = None
    todo: int = 0
    failed: int = 0
    written: int = 0
    records: list[dict] = field(default_factory=list)
    model: Any = None


def _print(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_files(items: Sequence[Item], load: Callable[[], Any], decode: Callable[[Any, list[np.ndarray]], Sequence[dict]],
              record: Callable[[Outcome], dict], *, batch_size: int = 8, out: str | os.PathLike | None = None,
              key: Callable[[dict], str] | None = None, settings: dict | None = None, debug: bool = False,
              progress: str | None = None, loader: Callable[[str], np.ndarray] | None = None,
              resumed: str = "files already done, skipped", noun: str = "results") -> RunResult:
    """Decode ``items`` with the model from ``load()`` and emit ``record(outcome)`` for each readable one.

    Records go to stdout (JSON lines) or, with ``out``, to that resumable file (``key(record)``
    names a record and must equal its item's ``key``; ``settings`` are checked and kept beside it).
    A resumed run says ``conslu: OUT: N of M <resumed>``. ``progress``: the progress bar's label
    (None: no bar). ``noun``: what the records are, for the decoding-failure message. See the
    module docstring for the reporting.
    """
    res = RunResult()
    writer: ResumableWriter | None = None
    if out is not None:
        assert key is not None, "a resumable output needs a record key"
        try:
            writer = open_output(out, key, settings or {})
        except (JSONLError, SettingsMismatch, OSError) as e:
            _print(f"conslu: {e}")
            res.code = 2
            return res
    try:
        todo = [it for it in items if writer is None or it.key not in writer.done]
        res.todo = len(todo)
        if writer is not None and len(todo) < len(items):
            _print(f"conslu: {out}: {len(items) - len(todo)} of {len(items)} {resumed}")
        if todo:
            try:
                model = load()
            except RunError as e:
                if debug and e.__cause__ is not None:
                    traceback.print_exception(e.__cause__)
                _print(f"conslu: {e}")
                res.code = e.code
                return res
            res.model = model
            report = Reporter(len(todo), debug=debug, desc=progress)
            try:
                for oc in run_batches(lambda audios: decode(model, audios), todo, batch_size=batch_size,
                                      loader=loader):
                    if oc.ok:
                        rec = record(oc)
                        if writer is not None:
                            writer.write(rec)
                        else:
                            print(dumps(rec), flush=True)
                            res.records.append(rec)
                            res.written += 1
                    report.outcome(oc)
            except DecodeError as e:
                report.close()
                res.code = report_decode_error(e, debug, None if writer is None else writer.written, out, noun)
                return res
            finally:
                report.close()
                res.failed = report.failed
    finally:
        if writer is not None:
            writer.close()
            res.written = writer.written
            res.records = list(writer.records)
    return res
