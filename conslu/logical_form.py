"""TOP bracket trees: parsing, canonical printing, decoupled form, skeletons.

A TOP logical form is one bracketed tree, for example::

    [IN:CREATE_ALARM Set the alarm [SL:DATE_TIME for tonight ] . ]

A node is ``[`` + a label (``IN:NAME`` for an intent, ``SL:NAME`` for a slot) followed by its
children (words and nodes) and a closing ``]``. Brackets are always structural: a word never
contains ``[`` or ``]``. The canonical text puts exactly one space between tokens, which is the
form TOPv2 and STOP use, so ``str(parse_tree(s)) == s`` for every canonical ``s``.
"""

from __future__ import annotations

import re
from typing import Iterator, Union

ROOT = "ROOT"
INTENT_PREFIX = "IN:"
SLOT_PREFIX = "SL:"

# One lexical item: an opening bracket with its (possibly empty) label, a closing bracket, or a word.
# what real STOP releases hold where a row has no decoupled tree (it cannot be scored or learnt from)
_EMPTY_TREES = ("", "nan")


def is_empty_tree(text: object) -> bool:
    """An empty (or ``nan``) reference tree, as some rows of real STOP releases have."""
    return not isinstance(text, str) or text.strip().lower() in _EMPTY_TREES


_LEX = re.compile(r"\[\s*([^\s\[\]]*)|\]|[^\s\[\]]+")
_LABEL_NAME = re.compile(r"[^\s\[\]:]+(?::[^\s\[\]:]+)*")


class MalformedTreeError(ValueError):
    """A string that is not a well-formed TOP tree; ``position`` is the 0-based character offset."""

    def __init__(self, reason: str, position: int, text: str = "") -> None:
        self.reason = reason
        self.position = position
        self.text = text
        super().__init__(f"malformed tree at char {position}: {reason}")


class Tree:
    """A node of a TOP tree: a label and its children (``Tree`` nodes or ``str`` words)."""

    __slots__ = ("label", "children")

    def __init__(self, label: str, children: list[Union["Tree", str]] | None = None) -> None:
        self.label = label
        self.children: list[Tree | str] = list(children) if children is not None else []

    @property
    def is_intent(self) -> bool:
        return self.label.startswith(INTENT_PREFIX)

    @property
    def is_slot(self) -> bool:
        return self.label.startswith(SLOT_PREFIX)

    def to_dict(self) -> dict:
        """The tree as JSON-ready nesting: ``{"label": "IN:X", "children": ["word", {...}, ...]}``."""
        return {"label": self.label,
                "children": [c.to_dict() if isinstance(c, Tree) else c for c in self.children]}

    def subtrees(self) -> Iterator["Tree"]:
        """All nodes in pre-order (this node first)."""
        stack: list[Tree] = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed([c for c in node.children if isinstance(c, Tree)]))

    def _parts(self, out: list[str], with_words: bool = True) -> None:
        out.append("[" + self.label)
        for child in self.children:
            if isinstance(child, Tree):
                child._parts(out, with_words)
            elif with_words:
                out.append(child)
        out.append("]")

    def __str__(self) -> str:
        out: list[str] = []
        self._parts(out)
        return " ".join(out)

    def __repr__(self) -> str:
        return f"Tree({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return self.label == other.label and self.children == other.children

    def __hash__(self) -> int:
        return hash(str(self))


def _check_label(label: str, position: int, text: str) -> None:
    if not label:
        raise MalformedTreeError("empty label after '['", position, text)
    if not (label.startswith(INTENT_PREFIX) or label.startswith(SLOT_PREFIX)):
        raise MalformedTreeError(f"label {label!r} lacks an IN:/SL: prefix", position, text)
    if not _LABEL_NAME.fullmatch(label[3:]):
        raise MalformedTreeError(f"label {label!r} has an empty or bad name", position, text)


def parse_tree(text: str) -> Tree:
    """Parse one TOP tree. Extra whitespace is tolerated; anything else malformed raises
    :class:`MalformedTreeError` naming the character position of the problem."""
    if not isinstance(text, str):
        raise MalformedTreeError(f"expected a string, got {type(text).__name__}", 0, "")
    root: Tree | None = None
    stack: list[Tree] = []
    opened_at: list[int] = []
    for m in _LEX.finditer(text):
        pos = m.start()
        item = m.group(0)
        if item[0] == "[":
            if root is not None and not stack:
                raise MalformedTreeError("trailing text after the root's closing ']'", pos, text)
            label = m.group(1)
            _check_label(label, m.start(1) if label else pos, text)
            node = Tree(label)
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            stack.append(node)
            opened_at.append(pos)
        elif item == "]":
            if not stack:
                if root is None:
                    raise MalformedTreeError("unbalanced ']' before any '['", pos, text)
                raise MalformedTreeError("unbalanced ']' after the root is closed", pos, text)
            stack.pop()
            opened_at.pop()
        else:
            if not stack:
                if root is None:
                    raise MalformedTreeError(f"text {item!r} outside the root bracket", pos, text)
                raise MalformedTreeError(f"trailing text {item!r} after the root's closing ']'", pos, text)
            stack[-1].children.append(item)
    if root is None:
        raise MalformedTreeError("empty input (no tree)", len(text), text)
    if stack:
        raise MalformedTreeError(
            f"unbalanced: '[{stack[-1].label}' opened at char {opened_at[-1]} is never closed",
            len(text), text)
    return root


def is_well_formed(text: str) -> bool:
    try:
        parse_tree(text)
    except MalformedTreeError:
        return False
    return True


def _as_tree(tree_or_text: "Tree | str") -> Tree:
    return tree_or_text if isinstance(tree_or_text, Tree) else parse_tree(tree_or_text)


def decouple(tree: "Tree | str") -> Tree:
    """STOP's decoupled form: a word is kept only when its nearest enclosing node is a slot.

    Words directly under an intent (the root or an intent nested in a slot) are dropped; labels
    and nesting are unchanged. ``[IN:A x [SL:B y [IN:C z [SL:D w ] ] ] ]`` becomes
    ``[IN:A [SL:B y [IN:C [SL:D w ] ] ] ]``.
    """
    tree = _as_tree(tree)
    keep_words = tree.is_slot
    children: list[Tree | str] = []
    for child in tree.children:
        if isinstance(child, Tree):
            children.append(decouple(child))
        elif keep_words:
            children.append(child)
    return Tree(tree.label, children)


def skeleton(tree_or_text: "Tree | str") -> str:
    """The label skeleton (all words dropped), e.g. ``[IN:X [SL:Y ] ]``; used for EM-tree."""
    out: list[str] = []
    _as_tree(tree_or_text)._parts(out, with_words=False)
    return " ".join(out)


def tokens(text: str) -> list[str]:
    """Lexical tokens of a TOP string, used for exact match.

    Each opening bracket is glued to its label (``"[IN:X"``; whitespace between them is dropped),
    each ``"]"`` and each word is its own token. Works on malformed strings too (no parsing), so a
    hypothesis can always be compared; for a canonical string this equals ``text.split()``.
    """
    out: list[str] = []
    for m in _LEX.finditer(text):
        item = m.group(0)
        out.append("[" + m.group(1) if item[0] == "[" else item)
    return out


def labels(tree: "Tree | str") -> list[str]:
    """Labels in pre-order."""
    return [node.label for node in _as_tree(tree).subtrees()]


def pairs(tree: "Tree | str") -> set[tuple[str, str]]:
    """(parent label, child label) pairs, including (ROOT, root label)."""
    tree = _as_tree(tree)
    out = {(ROOT, tree.label)}
    for node in tree.subtrees():
        for child in node.children:
            if isinstance(child, Tree):
                out.add((node.label, child.label))
    return out


def pair_list(tree: "Tree | str") -> list[tuple[str, str]]:
    """Like :func:`pairs` but every occurrence, in pre-order (for counting)."""
    tree = _as_tree(tree)
    out = [(ROOT, tree.label)]
    for node in tree.subtrees():
        out.extend((node.label, c.label) for c in node.children if isinstance(c, Tree))
    return out


def depth(tree: "Tree | str") -> int:
    """Nesting depth in labels: ``[IN:X ]`` is 1, ``[IN:X [SL:Y ] ]`` is 2."""
    tree = _as_tree(tree)
    best = 0
    stack: list[tuple[Tree, int]] = [(tree, 1)]
    while stack:
        node, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in node.children if isinstance(c, Tree))
    return best


def words(tree: "Tree | str") -> list[str]:
    """All words in order (for a decoupled tree: the slot words)."""
    out: list[str] = []

    def walk(node: Tree) -> None:
        for child in node.children:
            if isinstance(child, Tree):
                walk(child)
            else:
                out.append(child)

    walk(_as_tree(tree))
    return out
