"""Constrained decoding: a transformers LogitsProcessor that applies the ConSLU candidate sets.

``GrammarLogitsProcessor(tables, prompt_len, max_length)`` goes into
``model.generate(..., logits_processor=LogitsProcessorList([proc]))`` for greedy or beam search,
batched. At each call it needs the state of every row of ``input_ids``. Rows get reordered by
beam search and assisted / prompt-lookup decoding calls it on candidate prefixes, so states are
kept per prefix: a snapshot (ids, states) for each recent length. A row is matched to a
snapshot row with the same prefix (a polynomial hash of the prefix, then an exact check) and
advanced over the tokens after it; rows without a match are recomputed from the prompt. So the
processor is correct on arbitrary prefixes and costs one ``advance`` per step in the usual case.
Masked tokens get -inf (as transformers' own constraint processors do); allowed scores are left
as they are, so beams are ranked by the model's own probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor

from conslu.constraints import State, Tables, advance, candidate_mask, init_state

_HASH_SEED = 0x5EED


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token outside C_t. ``prompt_len``: decoder prompt tokens before the target;
    ``max_length``: total length limit (prompt + max_new_tokens) for the closing budget, or None."""

    def __init__(self, tables: Tables, prompt_len: int, max_length: int | None = None, history: int = 64) -> None:
        self.tables = tables
        self.prompt_len = int(prompt_len)
        self.max_length = max_length
        self.history = history
        self._snaps: dict[int, tuple[Tensor, Tensor | None, State]] = {}
        self._weights: Tensor | None = None

    def reset(self) -> None:
        self._snaps.clear()

    # -- prefix states ----------------------------------------------------------------------
    def _hash(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        if self._weights is None or self._weights.shape[0] < n or self._weights.device != ids.device:
            if self._weights is not None and self._weights.shape[0] < n:
                self._snaps.clear()  # hashes of stored snapshots used the old weights
            g = torch.Generator().manual_seed(_HASH_SEED)
            w = torch.randint(1, 2**62, (max(n, 4096),), generator=g, dtype=torch.long)
            self._weights = w.to(ids.device)
        return (ids.long() * self._weights[:n]).sum(1)

    def states(self, input_ids: Tensor) -> State:
        """State of each row after consuming ``input_ids[:, prompt_len:]``."""
        tables = self.tables
        if tables.device != input_ids.device:
            self.tables = tables = tables.to(input_ids.device)
        R, cur = input_ids.shape
        P = self.prompt_len
        if cur < P:
            raise ValueError(f"input_ids have {cur} tokens, fewer than the {P}-token decoder prompt")
        if cur == P:
            self._snaps.clear()  # a new generation
        prev = self._snaps.get(cur - 1)
        if prev is not None and prev[0].shape[0] == R and torch.equal(prev[0], input_ids[:, : cur - 1]):
            # the usual greedy/sampling step: same rows in the same order, one token longer
            state = advance(prev[2], input_ids[:, cur - 1], input_ids[:, P:], tables)
            self._remember(input_ids, state)
            return state
        state = init_state(R, tables, input_ids.device)
        start = torch.full((R,), P, dtype=torch.long, device=input_ids.device)
        todo = torch.ones(R, dtype=torch.bool, device=input_ids.device)
        for length in sorted((k for k in self._snaps if P < k <= cur), reverse=True):
            ids, hashes, snap = self._snaps[length]
            if hashes is None:
                hashes = self._hash(ids)
                self._snaps[length] = (ids, hashes, snap)
            eq = self._hash(input_ids[:, :length])[:, None] == hashes[None]
            parent = eq.to(torch.uint8).argmax(1)
            ok = todo & eq.any(1) & (input_ids[:, :length] == ids.index_select(0, parent)).all(1)
            state = snap.index(parent).where(ok, state)
            start = torch.where(ok, length, start)
            todo &= ~ok
            if not bool(todo.any()):
                break
        seq = input_ids[:, P:]
        first = int(start.min())
        for t in range(first, cur):
            moved = advance(state, input_ids[:, t], seq, tables)
            state = moved.where(start <= t, state)
        self._remember(input_ids, state)
        return state

    def _remember(self, input_ids: Tensor, state: State) -> None:
        """Keep a snapshot of this length (its hashes are computed only when a lookup needs them)."""
        cur = input_ids.shape[1]
        for k in [k for k in self._snaps if k > cur or k < cur - self.history]:
            del self._snaps[k]
        self._snaps[cur] = (input_ids.clone(), None, state)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] != self.tables.vocab_size:
            raise ValueError(f"scores have {scores.shape[-1]} columns; the constraint tables were built for {self.tables.vocab_size}")
        state = self.states(input_ids)
        remaining = None if self.max_length is None else self.max_length - input_ids.shape[1]
        mask = candidate_mask(state, input_ids[:, self.prompt_len:], self.tables, decoding=True, remaining=remaining)
        return scores.masked_fill(~mask, float("-inf"))
