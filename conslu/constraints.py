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
    - "]" (an intent without slots, or a slot, may close);
    - a copy, only when top is a SLOT (decoupled trees keep words only inside slots).
* Copies are whole words, in order. A transcript word is a word-initial piece (leading space, or
  the first transcript token) and the pieces after it up to the next word-initial piece. A copy
  either continues the current word (the piece right after the last copied one) or starts a new
  word at a word-initial position after the last completed word. "[", "]" and a new word need
  the current word complete. Where the first piece of a word occurs at several positions, the
  state keeps every position the word may be at (``wpos``) and the word completes at the earliest
  one that ends there; this greedy matching is complete, since the logical-form words are a
  subsequence of the transcript words. Only ordinary text tokens are ever copy candidates.
* When the tree closes (depth back to 0, DONE): only <|endoftext|> (or the pad token).
* After <|endoftext|> (END) or an impossible token (ERROR): only <|endoftext|>/pad.

Decoding-only length budget (``remaining`` = tokens that may still be generated, this one included):
the transcript is cut by forcing "|" when ``remaining <= 5`` ("|" "[" IN:X "]" eos), and in BODY at
depth d a "[" needs ``remaining >= d + 4`` and a copy at a word with w pieces left (this one
included) ``remaining >= w + d + 1``, so the tree always closes and ends with <|endoftext|> within
max_new_tokens (``MIN_NEW_TOKENS`` is the shortest closed output).

All state is tensors ([N] per row, stack [N, D], word positions [N, L]); ``advance`` moves N rows
by one token and ``candidate_mask`` gives the [N, V] bool mask for N states in a handful of tensor
ops (one gather of the grammar table, one scatter for copies, column writes for brackets/eos).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from conslu.tokenizer import SLUTokenizer

TRANSCRIPT, OPEN, LABEL, BODY, DONE, END, ERROR = range(7)
PHASE_NAMES = ("transcript", "open", "label", "body", "done", "end", "error")
ROOT_INDEX = 0
EXTRA_DEPTH = 4
MIN_NEW_TOKENS = 5  # "|" "[" IN:X "]" <|endoftext|>: the shortest constrained output


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
    word_start: Tensor  # [V] bool: text tokens that begin a word (a leading space)
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
    word_start = torch.zeros(V, dtype=torch.bool)
    word_start[: tokenizer.eos_token_id] = torch.tensor(tokenizer.word_initial_flags())
    is_slot = torch.tensor([False] + [lab.startswith("SL:") for lab in labels])
    t = Tables(vocab_size=V, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
               open_id=tokenizer.open_id, close_id=tokenizer.close_id, sep_id=tokenizer.sep_id,
               max_depth=int(getattr(grammar, "max_depth", 8) or 8) + EXTRA_DEPTH, labels=labels,
               rows=rows, label_parent=label_parent, is_copyable=is_copyable, word_start=word_start,
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
    wpos: Tensor | None = None  # [N, L] bool: positions the current word's last copied piece may be at

    def fit(self, width: int) -> "State":
        """The same state with ``wpos`` cut or zero-padded to ``width`` target positions."""
        return replace(self, wpos=fit_width(self.wpos, len(self), width, self.phase.device))

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
                if a.dim() == 2 and a.shape[1] != b.shape[1]:  # wpos of targets of different lengths
                    w = max(a.shape[1], b.shape[1])
                    a, b = fit_width(a, a.shape[0], w, a.device), fit_width(b, b.shape[0], w, b.device)
                c = cond.view(-1, *([1] * (a.dim() - 1)))
                out[f.name] = torch.where(c, a, b)
        return State(**out)

    def to(self, device: Any) -> "State":
        return State(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                        for f in fields(self)})

    def __len__(self) -> int:
        return int(self.phase.shape[0])


def fit_width(x: Tensor | None, n: int, width: int, device: Any) -> Tensor:
    """[n, width] bool: ``x`` cut or padded with False (None: all False)."""
    if x is None:
        return torch.zeros(n, width, dtype=torch.bool, device=device)
    if x.shape[1] >= width:
        return x[:, :width]
    return F.pad(x, (0, width - x.shape[1]))


def init_state(n: int, tables: Tables, device: Any = None, phase: int = TRANSCRIPT) -> State:
    device = device if device is not None else tables.device
    z = torch.zeros(n, dtype=torch.long, device=device)
    return State(phase=torch.full((n,), phase, dtype=torch.long, device=device), depth=z, top=z.clone(),
                 ptr=torch.full((n,), -1, dtype=torch.long, device=device), tlen=z.clone(),
                 stack=torch.zeros(n, tables.max_depth, dtype=torch.long, device=device),
                 wpos=torch.zeros(n, 0, dtype=torch.bool, device=device))


@dataclass
class _Words:
    """Word facts of each row's transcript and of its current word (see the module docstring)."""

    pos: Tensor  # [L] positions
    inside: Tensor  # [N, L] position < tlen
    start: Tensor  # [N, L] a word begins here
    end: Tensor  # [N, L] a word ends here
    wpos: Tensor  # [N, L] where the current word's last copied piece may be
    boundary: Tensor  # [N] the current word is complete (or none is open)
    base: Tensor  # [N] end of the last completed word (-1: none), counting the current one if complete
    cont: Tensor  # [N, L] positions of a piece that continues the current word
    new: Tensor  # [N, L] positions where a new word may start


def _words(state: State, seq: Tensor, tables: Tables) -> _Words:
    N, L = seq.shape
    pos = torch.arange(L, device=seq.device)
    inside = pos[None] < state.tlen[:, None]
    start = inside & ((pos[None] == 0) | tables.word_start[seq.long().clamp(0, tables.vocab_size - 1)])
    nxt = torch.cat([start[:, 1:], torch.ones(N, 1, dtype=torch.bool, device=seq.device)], 1)
    end = inside & (nxt | (pos[None] + 1 >= state.tlen[:, None]))
    wpos = fit_width(state.wpos, N, L, seq.device)
    open_word = wpos.any(1)
    ends_here = wpos & end
    boundary = ~open_word | ends_here.any(1)
    first_end = torch.where(ends_here, pos[None], L).min(1).values if L else state.ptr
    base = torch.where(open_word & boundary, first_end, state.ptr)
    cont = F.pad(wpos, (1, 0))[:, :L] & inside & ~start
    new = boundary[:, None] & start & (pos[None] > base[:, None])
    return _Words(pos, inside, start, end, wpos, boundary, base, cont, new)


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

    w = _words(state, seq, tables)
    match = seq == tok[:, None]
    cont, new_word = w.cont & match, w.new & match
    is_cont = cont.any(1)
    copy_ok = in_body & is_copy & tables.is_slot[top] & (is_cont | new_word.any(1))
    push = in_label & is_label & (depth < tables.max_depth)
    pop = in_body & is_close & w.boundary
    body_open = in_body & is_open & (depth < tables.max_depth) & w.boundary

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
    commit = (copy_ok & ~is_cont) | pop | body_open  # the current word (if any) is complete
    ptr = torch.where(commit, w.base, ptr)
    wpos = torch.where(copy_ok[:, None], torch.where(is_cont[:, None], cont, new_word),
                       w.wpos & ~(pop | body_open)[:, None])
    stack = state.stack
    if stack is not None:
        slot = depth.clamp(max=tables.max_depth - 1)[:, None]
        stack = stack.scatter(1, slot, torch.where(push, lab, stack.gather(1, slot).squeeze(1))[:, None])
        below = stack.gather(1, (depth - 2).clamp(min=0)[:, None]).squeeze(1)
        top = torch.where(push, lab, torch.where(pop, torch.where(depth >= 2, below, ROOT_INDEX), top))
    else:
        top = torch.where(push, lab, top)  # pops need the stack; teacher forcing resolves top itself
    depth = depth + push.long() - pop.long()
    return State(phase=new, depth=depth, top=top, ptr=ptr, tlen=tlen, stack=stack, wpos=wpos)


def candidate_mask(state: State, seq: Tensor, tables: Tables, *, decoding: bool = False,
                   remaining: Tensor | int | None = None) -> Tensor:
    """[N, V] bool candidate sets C_t for N states (see the module docstring for the rules).

    ``seq`` [N, L]: each row's target tokens (transcript at 0..tlen-1). ``decoding`` selects the
    decoding transcript set; ``remaining`` (decoding only) enables the length budget.
    """
    phase, depth, top = state.phase, state.depth, state.top
    N = phase.shape[0]
    V, P = tables.vocab_size, tables.n_parents
    in_tr, in_body = phase == TRANSCRIPT, phase == BODY
    tr_row = P + 2 if decoding else P + 1
    if remaining is not None:
        remaining = torch.as_tensor(remaining, device=phase.device).expand(N)
        tr_row = torch.where(remaining <= MIN_NEW_TOKENS, P + 3, tr_row)
    row = torch.where(phase == LABEL, top, torch.where(in_tr, tr_row, P))
    mask = tables.rows[row.reshape(-1)]  # [N, V+1] (advanced indexing: faster than index_select for bool on CPU)
    w = _words(state, seq, tables)
    open_ok = (phase == OPEN) | (in_body & tables.has_children[top] & (depth < tables.max_depth) & w.boundary)
    copy_ok = in_body & tables.is_slot[top]
    if remaining is not None:
        open_ok = open_ok & ((phase == OPEN) | (remaining >= depth + 4))
    mask[:, tables.open_id] |= open_ok
    mask[:, tables.close_id] |= in_body & w.boundary
    fin = phase >= DONE
    mask[:, tables.eos_id] |= fin
    mask[:, tables.pad_id] |= fin
    if seq.shape[1]:
        safe = seq.long().clamp(0, V - 1)
        ok = copy_ok[:, None] & (w.cont | w.new) & tables.is_copyable[safe]
        if remaining is not None:
            L = seq.shape[1]
            last = torch.where(w.end, w.pos[None], L).flip(1).cummin(1).values.flip(1)  # end of each word
            ok &= remaining[:, None] >= (last - w.pos[None] + 1) + depth[:, None] + 1
        mask.scatter_(1, torch.where(ok, safe, V), True)
    return mask[:, :V]
