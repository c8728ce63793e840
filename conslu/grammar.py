"""The label grammar: which labels may appear directly under which parent.

Extracted from training trees: for every parent (``ROOT`` for the root, each intent, each slot)
the set of child labels seen directly under it, with counts. ConSLU's training loss and decoder
restrict every label step to the labels the grammar allows under the current parent.

The JSON file (``Grammar.save``) is deterministic: sorted keys and lists, source files recorded by
base name and sha256 (not by absolute path), so rebuilding from the same data gives the same bytes.

Shipped grammars are package data (``conslu/grammars/<name>.json``, found with
:mod:`importlib.resources`, so a wheel install has them too). Wherever a user names a grammar
(``conslu init --grammar``, ``conslu grammar show``, ``ConSLU.init``) :func:`load_grammar` takes a
file path or a shipped short name such as ``topv2``; an existing file wins over a short name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from conslu.atomic import atomic_write_text
from conslu.logical_form import (
    INTENT_PREFIX,
    ROOT,
    SLOT_PREFIX,
    MalformedTreeError,
    Tree,
    depth,
    pair_list,
    parse_tree,
)

FORMAT_NAME = "conslu-grammar"
FORMAT_VERSION = 1

# Shipped grammars: <name>.json in this folder of the conslu package.
SHIPPED_DIR = "grammars"

# Logical-form columns, in order of preference, when --field is not given.
DEFAULT_FIELDS = ("decoupled_normalized_seqlogical", "semantic_parse", "normalized_seqlogical", "seqlogical")


class GrammarError(ValueError):
    """A bad grammar file or data file; the message names the file (and line)."""


# ----------------------------------------------------------------------------------------------
# Fast reading of TOPv2 / STOP tsv files (only the logical-form column; no normalisation).


@dataclass(frozen=True)
class TreeRow:
    path: str
    line: int          # 1-based line number in the file
    text: str          # the logical-form string
    domain: str | None


def resolve_data(paths: Sequence[str | os.PathLike], splits: Sequence[str] = ("train",)) -> list[Path]:
    """Expand DATA arguments to tsv files.

    A file is used as is. A folder is a STOP root (``manifests/<split>.tsv``) or a folder of TOPv2
    files (``*_<split>.tsv``); only the given splits are taken from it.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found: list[Path] = []
            for split in splits:
                manifest = p / "manifests" / f"{split}.tsv"
                if manifest.is_file():
                    found.append(manifest)
                found.extend(sorted(p.glob(f"*_{split}.tsv")))
            if not found:
                raise GrammarError(f"{p}: folder has no manifests/{{{','.join(splits)}}}.tsv and no *_<split>.tsv files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise GrammarError(f"{p}: no such file or folder")
    return out


def iter_tree_rows(path: str | os.PathLike, field: str | None = None,
                   on_bad: Callable[[str], None] | None = None) -> Iterator[TreeRow]:
    """Yield the logical-form column of a tab-separated file with a header row (TOPv2 or STOP).

    A row whose field count differs from the header raises :class:`GrammarError`
    ("file:line: ..."), or, with ``on_bad``, is passed to it as that message and skipped.
    """
    path = str(path)
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise GrammarError(f"{path}: cannot read: {e.strerror or e}") from None
    with fh:
        header_line = fh.readline()
        header = header_line.lstrip("\ufeff").rstrip("\r\n").split("\t")
        if not header_line or header == [""]:
            raise GrammarError(f"{path}:1: empty file (expected a header row)")
        if field is not None:
            if field not in header:
                raise GrammarError(f"{path}:1: no column {field!r} in header {header}")
            col = header.index(field)
        else:
            col = next((header.index(f) for f in DEFAULT_FIELDS if f in header), -1)
            if col < 0:
                raise GrammarError(f"{path}:1: no logical-form column (one of {', '.join(DEFAULT_FIELDS)}) in header {header}")
        dcol = header.index("domain") if "domain" in header else -1
        width = len(header)
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cells = line.split("\t")
            if len(cells) != width:
                msg = f"{path}:{lineno}: expected {width} tab-separated fields, got {len(cells)}"
                if on_bad is None:
                    raise GrammarError(msg)
                on_bad(msg)
                continue
            yield TreeRow(path, lineno, cells[col], cells[dcol] if dcol >= 0 else None)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_trees(paths: Sequence[str | os.PathLike], field: str | None = None, skip_bad: bool = False,
               skipped: list[str] | None = None) -> Iterator[tuple[TreeRow, Tree]]:
    """Parse every row's tree. Malformed trees raise ``GrammarError`` ("file:line: reason") unless
    ``skip_bad``; then the messages are appended to ``skipped``."""
    sink: list[str] = skipped if skipped is not None else []
    for path in paths:
        for row in iter_tree_rows(path, field, sink.append if skip_bad else None):
            try:
                tree = parse_tree(row.text)
            except MalformedTreeError as e:
                msg = f"{row.path}:{row.line}: {e}"
                if not skip_bad:
                    raise GrammarError(msg) from None
                sink.append(msg)
                continue
            yield row, tree


# ----------------------------------------------------------------------------------------------


class Grammar:
    """Parent label -> allowed child labels (``ROOT`` is the root's parent)."""

    def __init__(self, children: dict[str, set[str]] | None = None,
                 counts: dict[str, dict[str, int]] | None = None, max_depth: int = 0,
                 sources: Sequence[dict] = (), n_trees: int = 0) -> None:
        self.counts: dict[str, dict[str, int]] = {p: dict(c) for p, c in (counts or {}).items()}
        self.children: dict[str, set[str]] = {p: set(c) for p, c in (children or {}).items()}
        for parent, cs in self.counts.items():
            self.children.setdefault(parent, set()).update(cs)
        self.max_depth = int(max_depth)
        self.sources: list[dict] = [dict(s) for s in sources]
        self.n_trees = int(n_trees)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def extract(cls, trees: Iterable[Tree | str], sources: Sequence[dict] = ()) -> "Grammar":
        """Build from trees (``Tree`` objects or TOP strings; a malformed string raises)."""
        counts: dict[str, Counter] = {}
        max_depth = 0
        n = 0
        for tree in trees:
            if not isinstance(tree, Tree):
                tree = parse_tree(tree)
            n += 1
            for parent, child in pair_list(tree):
                counts.setdefault(parent, Counter())[child] += 1
            max_depth = max(max_depth, depth(tree))
        return cls(counts={p: dict(c) for p, c in counts.items()}, max_depth=max_depth, sources=sources, n_trees=n)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], field: str | None = None, skip_bad: bool = False,
                   skipped: list[str] | None = None) -> "Grammar":
        paths = [Path(p) for p in paths]
        sources = [{"path": p.name, "sha256": sha256_file(p)} for p in paths]
        return cls.extract((t for _, t in read_trees(paths, field, skip_bad, skipped)), sources)

    # -- queries ------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        out = set(self.children)
        for cs in self.children.values():
            out.update(cs)
        out.discard(ROOT)
        return sorted(out)

    @property
    def intents(self) -> list[str]:
        return [lab for lab in self.labels if lab.startswith(INTENT_PREFIX)]

    @property
    def slots(self) -> list[str]:
        return [lab for lab in self.labels if lab.startswith(SLOT_PREFIX)]

    @property
    def n_pairs(self) -> int:
        return sum(len(cs) for cs in self.children.values())

    def allowed(self, parent: str) -> list[str]:
        """Sorted child labels allowed under ``parent`` (empty for an unknown parent)."""
        return sorted(self.children.get(parent, ()))

    def allows(self, parent: str, child: str) -> bool:
        return child in self.children.get(parent, ())

    def violations(self, tree: Tree | str) -> list[tuple[str, str]]:
        """Parent-child pairs of ``tree`` the grammar does not allow (each once, in pre-order).
        A malformed string raises ``MalformedTreeError``."""
        seen: set[tuple[str, str]] = set()
        out: list[tuple[str, str]] = []
        for pc in pair_list(tree):
            if pc not in seen and not self.allows(*pc):
                seen.add(pc)
                out.append(pc)
        return out

    def is_valid(self, tree: Tree | str) -> bool:
        """Well-formed and every parent-child pair allowed."""
        try:
            return not self.violations(tree)
        except MalformedTreeError:
            return False

    def stats(self) -> dict:
        return {"intents": len(self.intents), "slots": len(self.slots), "pairs": self.n_pairs,
                "max_depth": self.max_depth}

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        counts = {p: {c: self.counts.get(p, {}).get(c, 0) for c in sorted(cs)} for p, cs in sorted(self.children.items())}
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "root": ROOT,
            "stats": self.stats(),
            "n_trees": self.n_trees,
            "intents": self.intents,
            "slots": self.slots,
            "max_depth": self.max_depth,
            "children": {p: sorted(cs) for p, cs in sorted(self.children.items())},
            "counts": counts,
            "sources": sorted(self.sources, key=lambda s: (str(s.get("path", "")), str(s.get("sha256", "")))),
        }

    @classmethod
    def from_dict(cls, data: dict, origin: str = "grammar") -> "Grammar":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise GrammarError(f"{origin}: not a ConSLU grammar (missing \"format\": \"{FORMAT_NAME}\")")
        if data.get("version") != FORMAT_VERSION:
            raise GrammarError(f"{origin}: unsupported grammar version {data.get('version')!r}")
        children = data.get("children")
        if not isinstance(children, dict) or not all(
                isinstance(p, str) and isinstance(cs, list) and all(isinstance(c, str) for c in cs)
                for p, cs in children.items()):
            raise GrammarError(f"{origin}: \"children\" must map labels to lists of labels")
        counts = data.get("counts") or {}
        if not isinstance(counts, dict) or not all(isinstance(v, dict) for v in counts.values()):
            raise GrammarError(f"{origin}: \"counts\" must map labels to {{label: count}}")
        return cls({p: set(cs) for p, cs in children.items()},
                   {p: {c: int(n) for c, n in cs.items()} for p, cs in counts.items()},
                   int(data.get("max_depth", 0)), data.get("sources") or [], int(data.get("n_trees", 0)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Grammar":
        """Read a grammar JSON file (a path only; :func:`load_grammar` also takes shipped names)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise GrammarError(f"{path}: cannot read grammar: {e.strerror or e}") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str, origin: str = "grammar") -> "Grammar":
        """Parse the JSON text of a grammar file; errors name ``origin``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{origin}:{e.lineno}: invalid JSON: {e.msg}") from None
        return cls.from_dict(data, origin)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grammar):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        s = self.stats()
        return f"Grammar(intents={s['intents']}, slots={s['slots']}, pairs={s['pairs']}, max_depth={s['max_depth']})"


# ----------------------------------------------------------------------------------------------
# Shipped grammars and short names.


def _shipped_root():
    return resources.files("conslu") / SHIPPED_DIR


def shipped_grammars() -> list[str]:
    """Short names of the grammars shipped with the package (``conslu/grammars/<name>.json``)."""
    root = _shipped_root()
    if not root.is_dir():
        return []
    return sorted(f.name[: -len(".json")] for f in root.iterdir() if f.name.endswith(".json") and f.is_file())


def resolve_grammar(name_or_path: str | os.PathLike) -> Path:
    """The file of a grammar named by a path or a shipped short name (``topv2``).

    An existing file is returned as is (so a local file named like a shipped grammar wins); else a
    shipped name gives its package-data file. Neither raises :class:`GrammarError` with a one-line
    message listing the shipped names.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise GrammarError(f"{text}: is a folder, not a grammar JSON file")
    if text in shipped_grammars():
        return Path(str(_shipped_root() / f"{text}.json"))
    names = ", ".join(shipped_grammars()) or "none"
    raise GrammarError(f"{text}: no such grammar file and not a shipped grammar name (shipped: {names})")


def load_grammar(grammar: "Grammar | str | os.PathLike") -> Grammar:
    """A :class:`Grammar` from a ``Grammar`` (returned as is), a JSON file path or a shipped short
    name (:func:`resolve_grammar`)."""
    if isinstance(grammar, Grammar):
        return grammar
    return Grammar.load(resolve_grammar(grammar))


def check_coverage(grammar: Grammar, paths: Sequence[str | os.PathLike], field: str | None = None,
                   skip_bad: bool = True) -> dict:
    """How many trees in ``paths`` the grammar cannot express, and the unseen pairs (with counts).

    Malformed rows are counted under ``malformed`` (and listed, first 10) when ``skip_bad``.
    """
    skipped: list[str] = []
    n = bad = 0
    unseen: Counter = Counter()
    files: list[dict] = []
    for path in paths:
        fn = fbad = 0
        before = len(skipped)
        for _, tree in read_trees([path], field, skip_bad, skipped):
            fn += 1
            v = grammar.violations(tree)
            if v:
                fbad += 1
                unseen.update(v)
        files.append({"path": str(path), "n": fn, "inexpressible": fbad, "malformed": len(skipped) - before})
        n += fn
        bad += fbad
    return {
        "n": n,
        "inexpressible": bad,
        "fraction": bad / n if n else 0.0,
        "malformed": len(skipped),
        "malformed_first": skipped[:10],
        "unseen_pairs": [{"parent": p, "child": c, "trees": k}
                         for (p, c), k in sorted(unseen.items(), key=lambda x: (-x[1], x[0]))],
        "files": files,
    }
