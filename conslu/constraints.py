"""The decoder state machine and candidate sets C_t, as device tensors shared by loss and decoder.

Rules (simplified target ``<transcript> | <tree> <|endoftext|>``; "top" = innermost open label,
ROOT before the first "["):

* TRANSCRIPT phase (before "|"): free. The loss uses the full vocabulary there. Constrained
  *decoding* additionally bans <|endoftext|>, Whisper's special/timestamp tokens and the ConSLU
  structure tokens except "|" (the data never has them in a transcript).
* Right after "|" (OPEN): only "[".
* After "[" (LABEL): the labels the grammar allows under top (ROOT -> intents).
* After a label, a copied token or a "]" that leaves a label open (BODY):
    - "[" if the grammar allows any child under top and the stack is not full
      (capacity = grammar.max_depth + 4);
    - "]" always (an intent without slots, or a slot, may close);
    - a copy, only when top is a SLOT (decoupled trees keep words only inside slots): a transcript
      token at a position after the last copied one. The copy pointer moves to the EARLIEST
      matching position after it (greedy subsequence matching; complete, since the logical-form
      words are a subsequence of the transcript words and each word is tokenised identically).
* When the tree closes (depth back to 0, DONE): only <|endoftext|> (or the pad token).
* After <|endoftext|> (END) or an impossible token (ERROR): only <|endoftext|>/pad.

Decoding-only length budget (``remaining`` = tokens that may still be generated, this one included):
the transcript is cut by forcing "|" when ``remaining <= 5`` ("|" "[" IN:X "]" eos), and in BODY at
depth d a "[" needs ``remaining >= d + 4`` and a copy ``remaining >= d + 2``, so the tree always
closes and ends with <|endoftext|> within max_new_tokens.

All state is tensors ([N] per row, stack [N, D]); ``advance`` moves N rows by one token and
``candidate_mask`` gives the [N, V] bool mask for N states in a handful of tensor ops (one
index_select of the grammar table, one scatter for copies, column writes for brackets/eos).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from conslu.tokenizer import SLUTokenizer

TRANSCRIPT, OPEN, LABEL, BODY, DONE, END, ERROR = range(7)
PHASE_NAMES = ("transcript", "open", "label", "body", "done", "end", "error")
ROOT_INDEX = 0
EXTRA_DEPTH = 4


@dataclass
class Tables:
    """Grammar and vocabulary facts as tensors (move with ``.to(device)``).

    rows: [P + 4, V + 1] bool. Rows 0..P-1: labels allowed under parent p (0 = ROOT, 1 + i = i-th
    label); P: nothing; P+1: everything (loss, transcript); P+2: decoding transcript set; P+3: only
    "|". The extra last column is a sink for masked-out scatter writes.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    open_id: int
    close_id: int
    sep_id: int
    max_depth: int
    labels: list[str]
    rows: Tensor
    label_parent: Tensor  # [V] long: parent index of a label token, -1 otherwise
    is_copyable: Tensor  # [V] bool: ordinary text tokens
    has_children: Tensor  # [P] bool
    is_slot: Tensor  # [P] bool

    @property
    def n_parents(self) -> int:
        return len(self.labels) + 1

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: Any) -> "Tables":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    @property
    def grammar_mask(self) -> Tensor:
        """[n_parents, V] bool: parent index -> allowed label token ids."""
        return self.rows[: self.n_parents, : self.vocab_size]


def build_tables(tokenizer: "SLUTokenizer", vocab_size: int | None = None, device: Any = None) -> Tables:
    """Tables for a simplified-format SLUTokenizer; ``vocab_size`` = the model's logits width."""
    if tokenizer.target_format != "simplified" or tokenizer.grammar is None:
        raise ValueError("constraints need the simplified target format and a grammar")
    grammar = tokenizer.grammar
    V = int(vocab_size or len(tokenizer))
    if V < len(tokenizer):
        raise ValueError(f"vocab_size {V} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    labels = list(tokenizer.label_tokens)
    index = {lab: i + 1 for i, lab in enumerate(labels)}
    P = len(labels) + 1
    rows = torch.zeros(P + 4, V + 1, dtype=torch.bool)
    parents = [("ROOT", 0)] + [(lab, index[lab]) for lab in labels]
    for name, p in parents:
        for child in grammar.children.get(name, ()):
            if child in tokenizer.label_ids:
                rows[p, tokenizer.label_ids[child]] = True
    has_children = rows[:P].any(1)
    rows[P + 1, :V] = True
    decode = torch.zeros(V + 1, dtype=torch.bool)
    decode[: tokenizer.eos_token_id] = True  # ordinary text
    decode[tokenizer.sep_id] = True
    rows[P + 2] = decode
    rows[P + 3, tokenizer.sep_id] = True
    label_parent = torch.full((V,), -1, dtype=torch.long)
    for lab, p in index.items():
        label_parent[tokenizer.label_ids[lab]] = p
    is_copyable = torch.zeros(V, dtype=torch.bool)
    is_copyable[: tokenizer.eos_token_id] = True
    is_slot = torch.tensor([False] + [lab.startswith("SL:") for lab in labels])
    t = Tables(vocab_size=V, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
               open_id=tokenizer.open_id, close_id=tokenizer.close_id, sep_id=tokenizer.sep_id,
               max_depth=int(getattr(grammar, "max_depth", 8) or 8) + EXTRA_DEPTH, labels=labels,
               rows=rows, label_parent=label_parent, is_copyable=is_copyable,
               has_children=has_children, is_slot=is_slot)
    return t.to(device) if device is not None else t


@dataclass
class State:
    """Per-row decoder state. ``ptr``/``tlen`` are positions relative to the first target token."""

    phase: Tensor  # [N] long
    depth: Tensor  # [N] long, number of open labels
    top: Tensor  # [N] long, parent index of the innermost open label (ROOT_INDEX at depth 0)
    ptr: Tensor  # [N] long, position of the last copied transcript token (-1: none yet)
    tlen: Tensor  # [N] long, transcript length (tokens before "|")
    stack: Tensor | None = None  # [N, D] long parent indices (decoder only)

    def index(self, rows: Tensor) -> "State":
        return State(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).index_select(0, rows))
                        for f in fields(self)})

    def where(self, cond: Tensor, other: "State") -> "State":
        """Rows from self where cond, else from other."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = None
            else:
                c = cond.view(-1, *([1] * (a.dim() - 1)))
                out[f.name] = torch.where(c, a, b)
        return State(**out)

    def to(self, device: Any) -> "State":
        return State(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                        for f in fields(self)})

    def __len__(self) -> int:
        return int(self.phase.shape[0])


def init_state(n: int, tables: Tables, device: Any = None, phase: int = TRANSCRIPT) -> State:
    device = device if device is not None else tables.device
    z = torch.zeros(n, dtype=torch.long, device=device)
    return State(phase=torch.full((n,), phase, dtype=torch.long, device=device), depth=z, top=z.clone(),
                 ptr=torch.full((n,), -1, dtype=torch.long, device=device), tlen=z.clone(),
                 stack=torch.zeros(n, tables.max_depth, dtype=torch.long, device=device))


def advance(state: State, tok: Tensor, seq: Tensor, tables: Tables) -> State:
    """State after consuming ``tok`` [N]; ``seq`` [N, L] holds each row's target tokens (transcript first)."""
    phase, depth, top, ptr, tlen = state.phase, state.depth, state.top, state.ptr, state.tlen
    tok = tok.long()
    V = tables.vocab_size
    safe = tok.clamp(0, V - 1)
    in_vocab = (tok >= 0) & (tok < V)
    is_eos = (tok == tables.eos_id) | (tok == tables.pad_id)
    is_open = tok == tables.open_id
    is_close = tok == tables.close_id
    is_sep = tok == tables.sep_id
    lab = torch.where(in_vocab, tables.label_parent[safe], -1)
    is_label = lab >= 0
    is_copy = tables.is_copyable[safe] & in_vocab

    in_tr, in_open, in_label = phase == TRANSCRIPT, phase == OPEN, phase == LABEL
    in_body, in_done = phase == BODY, phase == DONE

    # copy pointer: earliest transcript position > ptr holding tok
    L = seq.shape[1]
    pos = torch.arange(L, device=seq.device)
    hit = (seq == tok[:, None]) & (pos[None] > ptr[:, None]) & (pos[None] < tlen[:, None])
    found = hit.any(1)
    first = hit.to(torch.uint8).argmax(1)
    copy_ok = in_body & is_copy & found & tables.is_slot[top]
    push = in_label & is_label & (depth < tables.max_depth)
    pop = in_body & is_close
    body_open = in_body & is_open & (depth < tables.max_depth)

    new = torch.full_like(phase, ERROR)
    new = torch.where(in_tr, torch.where(is_sep, OPEN, torch.where(is_eos, END, TRANSCRIPT)), new)
    new = torch.where(in_open & is_open, LABEL, new)
    new = torch.where(push, BODY, new)
    new = torch.where(body_open, LABEL, new)
    new = torch.where(copy_ok, BODY, new)
    new = torch.where(pop, torch.where(depth == 1, DONE, BODY), new)
    new = torch.where((in_body | in_done) & is_eos, END, new)
    new = torch.where(phase >= END, phase, new)

    tlen = tlen + (in_tr & ~is_sep & ~is_eos).long()
    ptr = torch.where(copy_ok, first, ptr)
    stack = state.stack
    if stack is not None:
        slot = depth.clamp(max=tables.max_depth - 1)[:, None]
        stack = stack.scatter(1, slot, torch.where(push, lab, stack.gather(1, slot).squeeze(1))[:, None])
        below = stack.gather(1, (depth - 2).clamp(min=0)[:, None]).squeeze(1)
        top = torch.where(push, lab, torch.where(pop, torch.where(depth >= 2, below, ROOT_INDEX), top))
    else:
        top = torch.where(push, lab, top)  # pops need the stack; teacher forcing resolves top itself
    depth = depth + push.long() - pop.long()
    return State(phase=new, depth=depth, top=top, ptr=ptr, tlen=tlen, stack=stack)


def candidate_mask(state: State, seq: Tensor, tables: Tables, *, decoding: bool = False,
                   remaining: Tensor | int | None = None) -> Tensor:
    """[N, V] bool candidate sets C_t for N states (see the module docstring for the rules).

    ``seq`` [N, L]: each row's target tokens (transcript at 0..tlen-1). ``decoding`` selects the
    decoding transcript set; ``remaining`` (decoding only) enables the length budget.
    """
    phase, depth, top, ptr, tlen = state.phase, state.depth, state.top, state.ptr, state.tlen
    V, P = tables.vocab_size, tables.n_parents
    in_tr, in_body = phase == TRANSCRIPT, phase == BODY
    tr_row = P + 2 if decoding else P + 1
    if remaining is not None:
        tr_row = torch.where(torch.as_tensor(remaining, device=phase.device) <= 5, P + 3, tr_row)
    row = torch.where(phase == LABEL, top, torch.where(in_tr, tr_row, P))
    mask = tables.rows[row.reshape(-1)]  # [N, V+1] (advanced indexing: faster than index_select for bool on CPU)
    open_ok = (phase == OPEN) | (in_body & tables.has_children[top] & (depth < tables.max_depth))
    copy_ok = in_body & tables.is_slot[top]
    if remaining is not None:
        open_ok = open_ok & ((phase == OPEN) | (remaining >= depth + 4))
        copy_ok = copy_ok & (remaining >= depth + 2)
    mask[:, tables.open_id] |= open_ok
    mask[:, tables.close_id] |= in_body
    fin = phase >= DONE
    mask[:, tables.eos_id] |= fin
    mask[:, tables.pad_id] |= fin
    L = seq.shape[1]
    if L:
        pos = torch.arange(L, device=seq.device)
        ok = copy_ok[:, None] & (pos[None] > ptr[:, None]) & (pos[None] < tlen[:, None])
        cols = torch.where(ok, seq.long().clamp(0, V - 1), V)
        mask.scatter_(1, cols, True)
    return mask[:, :V]
