"""Readers for STOP manifests and TOPv2 text files, one table schema, and a STOP manifest writer.

Every reader returns a :class:`datasets.Dataset` with the columns :data:`COLUMNS`:

- ``id``: STOP ``file_id``; TOPv2 ``f"{domain}_{split}_{line}"`` with ``line`` the 1-based line
  number in the file (the header is line 1), so ids are stable across runs and filters.
- ``audio``: absolute path of the wav file (STOP) or ``None`` (TOPv2).
- ``transcript``: the normalised utterance (lower case); ``logical_form``: the decoupled
  normalised tree (labels upper case, words lower case, canonical spacing).
- ``split``, ``domain``, ``gender``, ``native`` (``None`` where unknown).

Bad input raises :class:`DataError` with ``"file:line: reason"``; with ``skip_bad=True`` the row is
left out instead, logged, and its message appended to the optional ``skipped`` list.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from conslu.atomic import atomic_write_text
from conslu.logical_form import MalformedTreeError, Tree, is_empty_tree, parse_tree, words as tree_words
from conslu.normalize import is_subsequence, normalize_example

__all__ = [
    "COLUMNS", "STOP_COLUMNS", "TOPV2_COLUMNS", "SPLITS", "DataError",
    "read_topv2", "read_stop", "read_any", "stop_row", "write_manifest", "topv2_split",
    "stop_manifests", "open_table", "spread",
]

log = logging.getLogger(__name__)

COLUMNS = ["id", "domain", "audio", "transcript", "logical_form", "split", "gender", "native"]
STOP_COLUMNS = ["file_id", "domain", "gender", "native", "utterance", "seqlogical",
                "normalized_utterance", "normalized_seqlogical", "decoupled_normalized_seqlogical"]
TOPV2_COLUMNS = ["domain", "utterance", "semantic_parse"]
SPLITS = ("train", "eval", "test")
_STOP_REQUIRED = ["file_id", "domain", "normalized_utterance", "decoupled_normalized_seqlogical"]

PathLike = Union[str, "os.PathLike[str]"]


def spread(n: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` rows spread evenly over ``n`` (all of them when limit is None or >= n):
    rows ``floor(i * n / limit)``, so every part of an ordered file (each domain) is represented."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        return []
    return [(i * n) // limit for i in range(limit)]


class DataError(ValueError):
    """Bad input data; the message reads ``"file:line: reason"`` (or ``"file: reason"``)."""


class _Collector:
    """Collects rows, enforcing unique ids, limits per split, and the skip_bad policy."""

    def __init__(self, limit: Optional[int], skip_bad: bool, skipped: Optional[list[str]],
                 notes: Optional[list[str]] = None) -> None:
        self.columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        #: ids of rows skipped for an empty (or ``nan``) reference tree, per manifest
        self.empty: dict[str, list[str]] = {}
        #: recording part folders (``eval_1``) that rows name but the release lacks: rows per part
        self.missing_parts: dict[str, int] = {}
        self.notes = notes
        self.seen: dict[str, str] = {}
        self.per_split: dict[str, int] = {}
        self.limit = limit
        self.skip_bad = skip_bad
        self.skipped = skipped if skipped is not None else []
        self.caller_reports = skipped is not None  # the caller prints the list itself

    def full(self, split: str) -> bool:
        return self.limit is not None and self.per_split.get(split, 0) >= self.limit

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.skipped.append(message)

    def rows(self, path: Any, rows: Iterable[tuple[int, list[str]]], header: list[str], split: str,
             domains: Optional[set[str]], domain_col: int) -> Iterator[tuple[int, str, list[str], str]]:
        """``(line, where, fields, domain)`` of each row to read: stops when the split is full, reports
        rows with the wrong field count, and skips rows outside ``domains``."""
        for lineno, fields in rows:
            if self.full(split):
                break
            where = f"{path}:{lineno}"
            if len(fields) != len(header):
                self.bad(f"{where}: expected {len(header)} fields, got {len(fields)}")
                continue
            domain = fields[domain_col].strip()
            if domains is not None and domain.lower() not in domains:
                continue
            yield lineno, where, fields, domain

    def add(self, row: dict[str, Any], where: str) -> None:
        first = self.seen.get(row["id"])
        if first is not None:
            self.bad(f"{where}: duplicated id {row['id']!r} (first at {first})")
            return
        self.seen[row["id"]] = where
        for c in COLUMNS:
            self.columns[c].append(row.get(c))
        self.per_split[row["split"]] = self.per_split.get(row["split"], 0) + 1

    def note(self, message: str) -> None:
        """Something left out that is not an error (``notes`` of the reader, else a log warning)."""
        if self.notes is not None:
            self.notes.append(message)
        else:
            log.warning("%s", message)

    def finish(self) -> None:
        """Report the empty references and missing recording parts of the manifests read."""
        for manifest, ids in self.empty.items():
            more = ", ..." if len(ids) > 3 else ""
            self.note(f"{manifest}: {len(ids)} row(s) with an empty reference skipped (not scored, not trained on; "
                      f"first: {', '.join(ids[:3])}{more})")
        self.empty = {}
        for part, n in self.missing_parts.items():
            self.note(f"{part}: recording part folder not found ({n} row(s) refer to it)")
        self.missing_parts = {}

    def dataset(self) -> "Any":
        import datasets

        if self.skipped and not self.caller_reports:
            log.warning("skipped %d bad row(s); first: %s", len(self.skipped), self.skipped[0])
        features = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
        return datasets.Dataset.from_dict(self.columns, features=features)


def _open_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-empty line; tolerates CRLF and a UTF-8 BOM."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line.split("\t")


def _header(path: Path, rows: Iterator[tuple[int, list[str]]]) -> list[str]:
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: empty file (no header)") from None
    return [h.strip() for h in header]


def open_table(path: Path, need: Sequence[str]) -> tuple[Iterator[tuple[int, list[str]]], list[str]]:
    """(rows after the header, header) of a TSV whose header has every column in ``need``."""
    rows = _open_tsv(path)
    header = _header(path, rows)
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} in the header "
                        f"(got {', '.join(header)})")
    return rows, header


def _canonical_tree(text: str) -> str:
    """Canonical spacing, lower-case words, labels as they are."""
    tree = parse_tree(text)

    def low(node: Tree) -> Tree:
        return Tree(node.label, [low(c) if isinstance(c, Tree) else c.lower() for c in node.children])

    return str(low(tree))


def _norm_filter(values: Optional[Iterable[str]]) -> Optional[set[str]]:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return {v.lower() for v in values}


# --------------------------------------------------------------------------------- TOPv2
_TOPV2_NAME = re.compile(r"(?P<domain>.+)_(?P<split>train|eval|test|valid|dev)$", re.I)


def topv2_split(path: PathLike) -> str:
    """The split named by a TOPv2 file name (``weather_eval.tsv`` -> ``eval``)."""
    m = _TOPV2_NAME.match(Path(path).stem)
    if not m:
        raise DataError(f"{path}: cannot tell the split from the file name "
                        "(expected <domain>_<train|eval|test>.tsv)")
    return m.group("split").lower()


def _read_topv2_file(path: Path, col: _Collector, splits: Optional[set[str]],
                     domains: Optional[set[str]]) -> None:
    split = topv2_split(path)
    if splits is not None and split not in splits:
        return
    rows, header = open_table(path, TOPV2_COLUMNS)
    idx = {c: header.index(c) for c in TOPV2_COLUMNS}
    for lineno, where, fields, domain in col.rows(path, rows, header, split, domains, idx["domain"]):
        try:
            ex = normalize_example(fields[idx["utterance"]], fields[idx["semantic_parse"]])
        except MalformedTreeError as e:
            col.bad(f"{where}: semantic_parse: {e}")
            continue
        if not ex.subsequence:
            col.bad(f"{where}: slot words are not a subsequence of the normalized utterance "
                    f"{ex.normalized_utterance!r}")
            continue
        col.add({"id": f"{domain}_{split}_{lineno}", "domain": domain, "audio": None,
                 "transcript": ex.normalized_utterance,
                 "logical_form": ex.decoupled_normalized_seqlogical, "split": split,
                 "gender": None, "native": None}, where)


def read_topv2(paths: Sequence[PathLike] | PathLike, *, splits: Optional[Iterable[str]] = None,
               domains: Optional[Iterable[str]] = None, limit: Optional[int] = None,
               skip_bad: bool = False, skipped: Optional[list[str]] = None) -> "Any":
    """Read TOPv2 ``<domain>_<split>.tsv`` files (columns domain, utterance, semantic_parse),
    normalising each utterance and tree with :func:`conslu.normalize.normalize_example`.

    ``limit`` caps the rows per split (in file order); rows whose slot words cannot be copied
    from the transcript are bad rows.
    """
    col = _Collector(limit, skip_bad, skipped)
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        _read_topv2_file(Path(p), col, _norm_filter(splits), _norm_filter(domains))
    return col.dataset()


# ---------------------------------------------------------------------------------- STOP
def stop_manifests(root: PathLike, splits: Optional[Iterable[str]] = None) -> list[tuple[Path, str]]:
    """(manifest, split) pairs of a STOP root folder (``manifests/{split}.tsv``)."""
    root = Path(root)
    mdir = root / "manifests"
    if not mdir.is_dir():
        raise DataError(f"{root}: not a STOP folder (no manifests/ folder)")
    wanted = [s.lower() for s in ([splits] if isinstance(splits, str) else splits)] if splits else None
    if wanted is None:
        found = [(mdir / f"{s}.tsv", s) for s in SPLITS if (mdir / f"{s}.tsv").is_file()]
        if not found:
            raise DataError(f"{mdir}: no train.tsv, eval.tsv or test.tsv")
        return found
    out = []
    for s in wanted:
        m = mdir / f"{s}.tsv"
        if not m.is_file():
            raise DataError(f"{m}: manifest for split {s!r} not found")
        out.append((m, s))
    return out


def _audio_candidates(root: Path, file_id: str, split: str) -> list[Path]:
    """The path as given, then the release's folder variant (``alarm_eval_0`` -> ``alarm_eval``)."""
    out = [root / file_id]
    for name in dict.fromkeys([split, "train", "eval", "test", "valid", "dev"]):
        variant = re.sub(rf"_({re.escape(name)})_\d+(?=[/\\])", r"_\1", file_id)
        if variant != file_id and root / variant not in out:
            out.append(root / variant)
    return out


def _part_folder(root: Path, file_id: str, known: dict[str, bool]) -> Optional[Path]:
    """The recording part folder (``root/eval_1``) of a file_id when it does not exist, else None."""
    head, sep, _ = file_id.replace("\\", "/").partition("/")
    if not sep:
        return None
    if head not in known:
        known[head] = (root / head).is_dir()
    return None if known[head] else root / head


def _read_stop_manifest(manifest: Path, split: str, root: Path, col: _Collector,
                        domains: Optional[set[str]], check_audio: bool) -> None:
    rows = _open_tsv(manifest)
    header = _header(manifest, rows)
    missing = [c for c in _STOP_REQUIRED if c not in header]
    computed = False
    if missing and all(c in header for c in ("file_id", "domain", "utterance", "seqlogical")):
        computed = True           # no normalised columns: compute them from utterance + seqlogical
    elif missing:
        raise DataError(f"{manifest}:1: missing column(s) {', '.join(missing)} in the header "
                        f"(got {', '.join(header)})")
    idx = {c: i for i, c in enumerate(header)}
    ref_column = "seqlogical" if computed else "decoupled_normalized_seqlogical"
    parts: dict[str, bool] = {}
    for lineno, where, fields, domain in col.rows(manifest, rows, header, split, domains, idx["domain"]):
        file_id = fields[idx["file_id"]].strip()
        if not file_id:
            col.bad(f"{where}: empty file_id")
            continue
        if is_empty_tree(fields[idx[ref_column]]):
            col.empty.setdefault(str(manifest), []).append(file_id)
            continue
        missing_part = _part_folder(root, file_id, parts)
        if missing_part is not None:
            if check_audio and not col.skip_bad:
                raise DataError(f"{missing_part}: recording part folder not found ({where} and every other row of "
                                f"part {missing_part.name!r} refer to it); is the release fully extracted?")
            col.missing_parts[str(missing_part)] = col.missing_parts.get(str(missing_part), 0) + 1
            if check_audio:
                continue
        try:
            if computed:
                ex = normalize_example(fields[idx["utterance"]], fields[idx["seqlogical"]])
                transcript, lf = ex.normalized_utterance, ex.decoupled_normalized_seqlogical
            else:
                transcript = " ".join(fields[idx["normalized_utterance"]].lower().split())
                lf = _canonical_tree(fields[idx["decoupled_normalized_seqlogical"]])
        except MalformedTreeError as e:
            column = "seqlogical" if computed else "decoupled_normalized_seqlogical"
            col.bad(f"{where}: {column}: {e}")
            continue
        candidates = _audio_candidates(root, file_id, split)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None and check_audio:
            tried = " or ".join(str(c) for c in candidates)
            col.bad(f"{where}: audio file not found: {tried}")
            continue
        audio = str((found or candidates[0]).resolve())
        if not is_subsequence(tree_words(lf), transcript.split()):
            log.debug("%s: slot words not a subsequence of the transcript", where)
        col.add({"id": file_id, "domain": domain, "audio": audio, "transcript": transcript,
                 "logical_form": lf, "split": split,
                 "gender": fields[idx["gender"]].strip() if "gender" in idx else None,
                 "native": fields[idx["native"]].strip() if "native" in idx else None}, where)


def read_stop(root_or_manifest: PathLike, split: Optional[Union[str, Sequence[str]]] = None, *,
              domains: Optional[Iterable[str]] = None, limit: Optional[int] = None,
              skip_bad: bool = False, check_audio: bool = True,
              skipped: Optional[list[str]] = None, notes: Optional[list[str]] = None) -> "Any":
    """Read a STOP release (official or synthetic): a root folder, or one manifest file.

    Every recording is a row: eval and test have two parts (``eval_0``, ``eval_1``), each read
    with the folder quirk. Rows whose reference tree is empty or ``nan`` (real releases have some)
    are skipped and reported on ``notes`` (count and first ids; a log warning without ``notes``).
    A part folder the rows name but the release lacks stops the read (``check_audio``; with
    ``skip_bad`` its rows are skipped and reported on ``notes``; without ``check_audio`` the rows
    are kept and the part is reported).

    ``split``: for a folder, the split(s) to read (default: every manifest present); for a
    manifest file, the split name (default: the file's stem, e.g. ``eval``). Audio paths are
    ``root/file_id``, or the variant without the part suffix (``eval_0/alarm_eval_0/x.wav`` is
    found at ``eval_0/alarm_eval/x.wav``). With ``check_audio=False`` a row whose file is at neither
    is kept with the path as given (its utterance fails alone where it is decoded). Manifests without the normalised columns but with utterance
    and seqlogical are normalised here.
    """
    path = Path(root_or_manifest)
    col = _Collector(limit, skip_bad, skipped, notes)
    if path.is_dir():
        pairs = stop_manifests(path, split)
        root = path
    elif path.is_file():
        if isinstance(split, (list, tuple)):
            raise DataError(f"{path}: one manifest file holds one split, got {list(split)}")
        pairs = [(path, (split or path.stem).lower())]
        root = path.parent.parent if path.parent.name == "manifests" else path.parent
    else:
        raise DataError(f"{path}: no such file or folder")
    doms = _norm_filter(domains)
    for manifest, s in pairs:
        _read_stop_manifest(manifest, s, root, col, doms, check_audio)
    col.finish()
    return col.dataset()


# ------------------------------------------------------------------------------ dispatch
def _kind(path: Path) -> str:
    if path.is_dir():
        return "stop-root"
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    with open(path, encoding="utf-8-sig") as f:
        header = [h.strip() for h in f.readline().rstrip("\r\n").split("\t")]
    if "file_id" in header:
        return "stop-manifest"
    if "semantic_parse" in header:
        return "topv2"
    raise DataError(f"{path}:1: neither a STOP manifest (file_id, ...) nor a TOPv2 file "
                    f"(domain, utterance, semantic_parse) header: {', '.join(header)}")


def read_any(paths: Sequence[PathLike] | PathLike, *, splits: Optional[Iterable[str]] = None,
             domains: Optional[Iterable[str]] = None, limit: Optional[int] = None,
             skip_bad: bool = False, check_audio: bool = True,
             skipped: Optional[list[str]] = None, notes: Optional[list[str]] = None) -> "Any":
    """Read any mix of STOP root folders, STOP manifests and TOPv2 files (by content).

    ``limit`` applies per split and per source; ids must be unique over all sources.
    """
    import datasets

    parts = []
    split_set = _norm_filter(splits)
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(p)
        kind = _kind(path)
        if kind == "topv2":
            parts.append(read_topv2([path], splits=split_set, domains=domains, limit=limit,
                                    skip_bad=skip_bad, skipped=skipped))
        elif kind == "stop-root":
            wanted = [s for s in SPLITS if (path / "manifests" / f"{s}.tsv").is_file()]
            if split_set is not None:
                wanted = [s for s in wanted if s in split_set]
            if wanted:
                parts.append(read_stop(path, wanted, domains=domains, limit=limit, skip_bad=skip_bad,
                                       check_audio=check_audio, skipped=skipped, notes=notes))
        else:
            s = path.stem.lower()
            if split_set is None or s in split_set:
                parts.append(read_stop(path, domains=domains, limit=limit, skip_bad=skip_bad,
                                       check_audio=check_audio, skipped=skipped, notes=notes))
    if not parts:
        return _Collector(None, skip_bad, skipped).dataset()
    out = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ids = out["id"]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        if not skip_bad:
            raise DataError(f"{', '.join(map(str, paths if not isinstance(paths, (str, os.PathLike)) else [paths]))}: "
                            f"duplicated id {dup!r} across sources")
        keep, seen = [], set()
        for k, i in enumerate(ids):
            if i in seen:
                (skipped if skipped is not None else []).append(f"duplicated id {i!r} across sources")
                continue
            seen.add(i)
            keep.append(k)
        out = out.select(keep)
    return out


# -------------------------------------------------------------------------------- writer
def stop_row(file_id: str, domain: str, gender: str, native: str, utterance: str,
             seqlogical: str) -> dict[str, str]:
    """All nine STOP manifest columns for one recording, normalised columns computed here.

    Raises :class:`conslu.logical_form.MalformedTreeError` for a malformed ``seqlogical``.
    """
    ex = normalize_example(utterance, seqlogical)
    return {"file_id": file_id, "domain": domain, "gender": gender, "native": native,
            "utterance": utterance, "seqlogical": seqlogical,
            "normalized_utterance": ex.normalized_utterance,
            "normalized_seqlogical": ex.normalized_seqlogical,
            "decoupled_normalized_seqlogical": ex.decoupled_normalized_seqlogical}


def write_manifest(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a STOP manifest (header + one row per mapping, :data:`STOP_COLUMNS` in order)
    atomically; a field holding a tab or newline is an error naming the row."""
    lines = ["\t".join(STOP_COLUMNS)]
    for n, row in enumerate(rows, 1):
        missing = [c for c in STOP_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{path}: row {n}: missing field(s) {', '.join(missing)}")
        values = ["" if row[c] is None else str(row[c]) for c in STOP_COLUMNS]
        bad = [c for c, v in zip(STOP_COLUMNS, values) if "\t" in v or "\n" in v or "\r" in v]
        if bad:
            raise ValueError(f"{path}: row {n} ({values[0]}): tab or newline in {', '.join(bad)}")
        lines.append("\t".join(values))
    return atomic_write_text(path, "\n".join(lines) + "\n")
