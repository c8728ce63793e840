"""JSON-lines I/O in one place: reading with ``file:line`` errors, atomic writes, and a resumable
appending writer.

Resumable output (``conslu parse --out``, ``conslu evaluate``) works like this: every record is
written as one ``json + "\\n"`` and flushed at once, so a killed run loses at most the line it was
writing. :class:`ResumableWriter` opens an existing file, drops an unterminated last line (the
trace of a kill mid-write; it is recomputed), remembers the keys already present and appends
after them. A second process appending to the same file at the same time would create
duplicates, so the writer holds an exclusive advisory lock (POSIX ``flock``) while open.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from conslu.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

__all__ = ["JSONLError", "iter_jsonl", "read_jsonl", "dumps", "atomic_write_text", "atomic_write_json",
           "atomic_write_jsonl", "ResumableWriter"]


NL = b"\n"


class JSONLError(ValueError):
    """Unreadable JSON-lines input; the message starts with ``file:line:`` (or ``file:``)."""


def dumps(record: dict) -> str:
    """One record as a single line (no newline; non-ASCII kept as is; NaN refused)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise JSONLError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(item, dict):
        raise JSONLError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
    return item


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JSONLError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise JSONLError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def iter_jsonl(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line.

    With ``allow_truncated_tail`` a last line without a newline that is not valid JSON (a run
    killed mid-write) is skipped instead of raising.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.split("\n")
    last = len(lines)  # the piece after the final "\n" ("" for a complete file)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if lineno == last and allow_truncated_tail:
            try:
                yield lineno, _parse_line(path, lineno, line)
            except JSONLError:
                return
            continue
        yield lineno, _parse_line(path, lineno, line)


def read_jsonl(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> list[dict]:
    """All objects of a JSON-lines file (see :func:`iter_jsonl`)."""
    return [item for _, item in iter_jsonl(path, allow_truncated_tail=allow_truncated_tail)]


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def _lock(f: Any, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise JSONLError(f"{path}: in use by another running conslu process (wait for it or choose another output)") from None


class ResumableWriter:
    """Append records to a JSON-lines file, skipping keys that are already in it.

    ``key(record) -> str`` names a record (e.g. its ``id`` or its ``file``). On open, complete
    lines are read (a malformed complete line raises :class:`JSONLError` with ``file:line``: that is
    not a kill's trace and we don't guess), an unterminated last line is cut off (reported on
    ``warn``), and their keys go to :attr:`done`. :meth:`write` writes and flushes one line;
    ``fsync=True`` also forces it to disk (slower; for power-loss safety).
    """

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], str], *, fsync: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.records: list[dict] = []
        self.done: set[str] = set()
        self.dropped_tail = False
        self.written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._f = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise JSONLError(f"{self.path}: cannot open for writing: {e.strerror or e}") from None
        try:
            _lock(self._f, self.path)
            self._load(warn or (lambda msg: print(msg, file=sys.stderr)))
        except BaseException:
            self._f.close()
            raise

    def _load(self, warn: Callable[[str], None]) -> None:
        f = self._f
        f.seek(0)
        data = f.read()
        end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if end < len(data):
            tail = data[end:]
            if tail.strip():
                self.dropped_tail = True
                lineno = data[:end].count(NL) + 1
                warn(f"conslu: {self.path}:{lineno}: dropped an incomplete last line "
                     f"({len(tail)} bytes, left by an interrupted run); it will be recomputed")
            f.truncate(end)
            data = data[:end]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = data[: e.start].count(NL) + 1
            raise JSONLError(f"{self.path}:{lineno}: not UTF-8 text ({e.reason})") from None
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            item = _parse_line(self.path, lineno, line)
            try:
                k = self.key(item)
            except (KeyError, TypeError, ValueError):
                raise JSONLError(f"{self.path}:{lineno}: record has no usable key") from None
            if k in self.done:
                raise JSONLError(f"{self.path}:{lineno}: duplicate record for {k!r}")
            self.done.add(k)
            self.records.append(item)
        f.seek(0, os.SEEK_END)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def write(self, record: dict) -> None:
        """Append one record (and flush it) unless its key is already present."""
        k = self.key(record)
        if k in self.done:
            return
        self._f.write((dumps(record) + "\n").encode("utf-8"))
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.done.add(k)
        self.records.append(record)
        self.written += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()  # closing releases the lock

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
