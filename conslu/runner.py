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

* ``devices=N`` shards the work over N processes (``torch.multiprocessing``, spawned; one per GPU
  with ``accelerator="cuda"``, else CPU processes sharing the cores): the items left to decode are
  cut into the batches one process would make, batch j goes to process j mod N, each process
  writes its records to a part file beside ``out`` and the parts are gathered into ``out`` in item
  order, so the file equals a one-process run's. A killed sharded run leaves its part files; the
  next run (with any N) gathers them first and decodes only what is missing.

Nothing here knows argparse or a particular model: the caller passes a ``load`` function (called
only when there is something to decode; for ``devices`` > 1 a picklable one with ``on(device)``)
and a ``decode(model, audios) -> [dict, ...]`` function.
"""

from __future__ import annotations

import json
import os
import re
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
           "run_batches", "run_files", "open_output", "settings_path", "report_decode_error", "part_paths"]

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


class _Chunks:
    """Map-style dataset of batches for a DataLoader: chunk j -> (outcome of each item's load, the
    prepared batch of the readable ones or None). Picklable (items, loader and prepare are)."""

    def __init__(self, chunks: list[list[Item]], loader: Callable[[str], np.ndarray],
                 prepare: Callable[[list[np.ndarray]], Any] | None) -> None:
        self.chunks, self.loader, self.prepare = chunks, loader, prepare

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> tuple[list[tuple[Item, tuple]], Any]:
        loaded = [(item, _load_one(item, self.loader)) for item in self.chunks[j]]
        audios = [audio for _, (audio, err, _) in loaded if err is None]
        if self.prepare is None or not audios:
            return loaded, None
        return [(item, (None, err, trace)) for item, (_, err, trace) in loaded], self.prepare(audios)


def _as_is(x: Any) -> Any:
    return x


def _loaded_batches(chunks: list[list[Item]], loader: Callable[[str], np.ndarray], prepare: Any, prefetch: int,
                    workers: int) -> Iterator[tuple[list[tuple[Item, tuple]], Any]]:
    """The chunks loaded (and prepared) ahead of use: in ``workers`` DataLoader processes, or in one
    background thread when ``workers`` is 0."""
    data = _Chunks(chunks, loader, prepare)
    if workers > 0:
        from torch.utils.data import DataLoader

        yield from DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                              prefetch_factor=max(1, prefetch))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conslu-audio") as pool:
        pending: deque[Future] = deque()
        nxt = 0

        def submit() -> None:
            nonlocal nxt
            if nxt < len(chunks):
                pending.append(pool.submit(data.__getitem__, nxt))
                nxt += 1

        for _ in range(max(1, prefetch)):
            submit()
        try:
            while pending:
                loaded = pending.popleft().result()
                submit()
                yield loaded
        finally:
            for fut in pending:
                fut.cancel()


def run_batches(decode: BatchFn, items: Iterable[Item], *, batch_size: int = 8,
                loader: Callable[[str], np.ndarray] | None = None,
                prefetch: int = PREFETCH_BATCHES, prepare: Callable[[list[np.ndarray]], Any] | None = None,
                workers: int = 0) -> Iterator[Outcome]:
    """Decode ``items`` in batches of readable audio; yields one :class:`Outcome` per item, in order.

    ``decode(batch)`` returns one dict per audio; the batch is the list of audio arrays, or
    ``prepare(audios)`` (log-mels, say) when ``prepare`` is given. Loading and preparing run ahead
    of the model by ``prefetch`` batches, in ``workers`` DataLoader processes (0: one background
    thread). Unreadable files yield error outcomes; an exception from ``decode`` raises
    :class:`DecodeError` (the outcomes of earlier batches have been yielded already).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    items = list(items)
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for loaded, prepared in _loaded_batches(chunks, loader or _default_loader, prepare, prefetch, workers):
        good = [(item, audio) for item, (audio, err, _) in loaded if err is None]
        results: list[dict] = []
        per_file = 0.0
        if good:
            t0 = time.perf_counter()
            try:
                results = list(decode(prepared if prepare is not None else [a for _, a in good]))
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


def _load_model(load: Callable[[], Any], debug: bool) -> Any:
    """``load()``; a :class:`RunError` is reported (its cause's traceback too under ``debug``) and raised."""
    try:
        return load()
    except RunError as e:
        if debug and e.__cause__ is not None:
            traceback.print_exception(e.__cause__)
        _print(f"conslu: {e}")
        raise


def _decode_into(model: Any, todo: list[Item], decode: Callable, record: Callable[[Outcome], dict],
                 emit: Callable[[dict], None], *, batch_size: int, loader: Callable | None, prepare: Callable | None,
                 workers: int, debug: bool, desc: str | None) -> tuple[int, DecodeError | None]:
    """Decode ``todo`` with ``model`` and ``emit(record(outcome))`` for each readable item, reporting
    the others; returns (items that could not be read, the DecodeError that stopped it or None)."""
    report = Reporter(len(todo), debug=debug, desc=desc)
    try:
        for oc in run_batches(lambda batch: decode(model, batch), todo, batch_size=batch_size, loader=loader,
                              prepare=None if prepare is None else prepare(model), workers=workers):
            if oc.ok:
                emit(record(oc))
            report.outcome(oc)
    except DecodeError as e:
        return report.failed, e
    finally:
        report.close()
    return report.failed, None


def part_paths(out: str | os.PathLike) -> list[Path]:
    """The part files of a sharded run on ``out`` (``.OUT.part<rank>``) that exist, by rank."""
    p = Path(out)
    found = [(int(m.group(1)), q) for q in p.parent.glob(f".{p.name}.part*")
             if (m := re.fullmatch(rf"\.{re.escape(p.name)}\.part(\d+)", q.name))]
    return [q for _, q in sorted(found)]


def _gather_parts(writer: ResumableWriter, out: str | os.PathLike, key: Callable[[dict], str],
                  order: Sequence[str]) -> int:
    """Move the records of ``out``'s part files into ``writer``, in ``order`` (then any others), and
    delete the parts; returns how many records were added."""
    parts = part_paths(out)
    if not parts:
        return 0
    found: dict[str, dict] = {}
    for q in parts:
        part = ResumableWriter(q, key, warn=lambda msg: None)  # complete lines only
        part.close()
        for rec in part.records:
            found.setdefault(key(rec), rec)
    before = writer.written
    for k in order:
        if k in found:
            writer.write(found.pop(k))
    for rec in found.values():  # keys outside ``order``, as found
        writer.write(rec)
    for q in parts:
        q.unlink(missing_ok=True)
        Path(str(q) + ".json").unlink(missing_ok=True)
    return writer.written - before


@dataclass
class _Shard:
    """What one process of a sharded run does (picklable: it crosses a spawn)."""

    rank: int
    world: int
    items: list[Item]
    load: Any
    decode: Callable[[Any, list[np.ndarray]], Sequence[dict]]
    record: Callable[[Outcome], dict]
    batch_size: int
    device: str
    part: str
    threads: int
    debug: bool = False
    progress: str | None = None
    loader: Callable[[str], np.ndarray] | None = None
    prepare: Callable[[Any], Any] | None = None
    workers: int = 0


def _run_shard(rank: int, shards: list[_Shard]) -> None:
    """One process of a sharded run: decode its batches into its part file; its outcome (failed
    count, exit code) goes to ``<part>.json``."""
    import torch

    sh = shards[rank]
    torch.set_num_threads(sh.threads)
    summary: dict[str, Any] = {"failed": 0, "code": None}
    try:
        try:
            model = _load_model(sh.load.on(sh.device) if hasattr(sh.load, "on") else sh.load, sh.debug)
        except RunError as e:
            summary["code"] = e.code
            return
        with open(sh.part, "a", encoding="utf-8") as f:

            def emit(rec: dict) -> None:
                f.write(dumps(rec) + "\n")
                f.flush()

            summary["failed"], err = _decode_into(
                model, sh.items, sh.decode, sh.record, emit, batch_size=sh.batch_size, loader=sh.loader,
                prepare=sh.prepare, workers=sh.workers, debug=sh.debug,
                desc=f"{sh.progress} [{sh.world} processes]" if sh.progress and rank == 0 else None)
        if err is not None:
            summary["code"] = report_decode_error(err, sh.debug, None, None, "")
    finally:
        atomic_write_json(Path(sh.part + ".json"), summary)


def _shard_devices(accelerator: str, devices: int) -> list[str]:
    import torch

    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda":
        have = torch.cuda.device_count()
        if have < devices:
            raise RunError(f"--devices {devices} needs {devices} CUDA devices, {have} visible")
        return [f"cuda:{r}" for r in range(devices)]
    if accelerator != "cpu":
        raise RunError(f"accelerator {accelerator!r}: expected cpu, cuda or auto")
    return ["cpu"] * devices


def _run_sharded(todo: list[Item], res: RunResult, load: Any, decode: Callable, record: Callable, *,
                 batch_size: int, out: str | os.PathLike, devices: int, accelerator: str, debug: bool,
                 progress: str | None, loader: Callable | None, prepare: Callable | None, workers: int) -> None:
    """Decode ``todo`` over ``devices`` processes into part files beside ``out`` (gathered by the caller)."""
    import torch.multiprocessing as mp

    names = _shard_devices(accelerator, devices)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    world = min(devices, len(batches))
    threads = max(1, (os.cpu_count() or 1) // world)  # the cores shared out, one share per process
    o = Path(out)
    shards = [_Shard(r, world, [it for b in batches[r::world] for it in b], load, decode, record, batch_size,
                     names[r], str(o.parent / f".{o.name}.part{r}"), threads, debug, progress, loader, prepare,
                     workers)
              for r in range(world)]
    _print(f"conslu: {len(todo)} items in {len(batches)} batches over {world} processes ({', '.join(names[:world])})")
    try:
        mp.start_processes(_run_shard, args=(shards,), nprocs=world, join=True, start_method="spawn")
    except Exception as e:  # noqa: BLE001 - a process died: keep what the others wrote
        _print(f"conslu: a decoding process failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        res.code = 1
    for sh in shards:
        try:
            summary = json.loads(Path(sh.part + ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            res.code = res.code or 1
            continue
        finally:
            Path(sh.part + ".json").unlink(missing_ok=True)
        res.failed += int(summary.get("failed", 0))
        if summary.get("code") is not None:
            res.code = res.code or int(summary["code"])


def run_files(items: Sequence[Item], load: Callable[[], Any], decode: Callable[[Any, list[np.ndarray]], Sequence[dict]],
              record: Callable[[Outcome], dict], *, batch_size: int = 8, out: str | os.PathLike | None = None,
              key: Callable[[dict], str] | None = None, settings: dict | None = None, debug: bool = False,
              progress: str | None = None, loader: Callable[[str], np.ndarray] | None = None,
              resumed: str = "files already done, skipped", noun: str = "results", devices: int = 1,
              accelerator: str = "auto", prepare: Callable[[Any], Callable[[list[np.ndarray]], Any]] | None = None,
              workers: int = 0) -> RunResult:
    """Decode ``items`` with the model from ``load()`` and emit ``record(outcome)`` for each readable one.

    Records go to stdout (JSON lines) or, with ``out``, to that resumable file (``key(record)``
    names a record and must equal its item's ``key``; ``settings`` are checked and kept beside it).
    A resumed run says ``conslu: OUT: N of M <resumed>``. ``progress``: the progress bar's label
    (None: no bar). ``noun``: what the records are, for the decoding-failure message.
    ``devices`` > 1 (needs ``out``): shard over that many processes on ``accelerator`` (``cpu``,
    ``cuda``, ``auto``). ``prepare(model)``: the batch preparer run ahead of decoding with the
    loading (``decode`` then gets its output), in ``workers`` DataLoader processes (0: a background
    thread). See the module docstring for the reporting.
    """
    res = RunResult()
    writer: ResumableWriter | None = None
    if devices > 1 and out is None:
        raise ValueError("a sharded run (devices > 1) writes to an output file")
    if out is not None:
        assert key is not None, "a resumable output needs a record key"
        try:
            writer = open_output(out, key, settings or {})
            gathered = _gather_parts(writer, out, key, [it.key for it in items])
            if gathered:
                _print(f"conslu: {out}: gathered {gathered} {noun} left by an interrupted sharded run")
        except (JSONLError, SettingsMismatch, OSError) as e:
            if writer is not None:
                writer.close()
            _print(f"conslu: {e}")
            res.code = 2
            return res
    try:
        todo = [it for it in items if writer is None or it.key not in writer.done]
        res.todo = len(todo)
        if writer is not None and len(todo) < len(items):
            _print(f"conslu: {out}: {len(items) - len(todo)} of {len(items)} {resumed}")
        if todo and devices > 1 and len(todo) > batch_size:
            assert writer is not None and out is not None and key is not None
            try:
                _run_sharded(todo, res, load, decode, record, batch_size=batch_size, out=out, devices=devices,
                             accelerator=accelerator, debug=debug, progress=progress, loader=loader, prepare=prepare,
                             workers=workers)
            except RunError as e:
                _print(f"conslu: {e}")
                res.code = e.code
                return res
            before = writer.written
            _gather_parts(writer, out, key, [it.key for it in todo])
            if res.code == 1:
                print(f"conslu: {writer.written - before} {noun} written to {out}; run again to resume", file=sys.stderr)
            return res
        if todo:
            try:
                model = _load_model(load, debug)
            except RunError as e:
                res.code = e.code
                return res
            res.model = model

            def emit(rec: dict) -> None:
                if writer is not None:
                    writer.write(rec)
                else:
                    print(dumps(rec), flush=True)
                    res.records.append(rec)
                    res.written += 1

            res.failed, err = _decode_into(model, todo, decode, record, emit, batch_size=batch_size, loader=loader,
                                           prepare=prepare, workers=workers, debug=debug, desc=progress)
            if err is not None:
                res.code = report_decode_error(err, debug, None if writer is None else writer.written, out, noun)
                return res
    finally:
        if writer is not None:
            writer.close()
            res.written = writer.written
            res.records = list(writer.records)
    return res
