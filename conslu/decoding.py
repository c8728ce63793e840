"""Decoding: one options object and one entry point for every caller, and the HF LogitsProcessor.

``decode(slu, options, input_features=... | encoder_hidden=...)`` is how ``ConSLU.parse``,
``conslu parse``, ``conslu evaluate``, validation during training, ``conslu bench``, the demo and
the ablation recipe decode. ``DecodingOptions`` (frozen) says how: greedy or beam search, the
candidate sets on or off, copy-speculative drafts, the length budget, the beam ranking, the prompt
language/task of a multilingual checkpoint and the loop guard. The prompt comes from
``SLUTokenizer.prompt_ids``, the same one training uses; the search is ``conslu.search.DecodingTask``.

``max_new_tokens`` counts the generated tokens after the prompt, the closing <|endoftext|>
included, for every search; with constraints it must leave room for the shortest closed tree
(``MIN_NEW_TOKENS``), and the length budget then makes every output close within it.

``GrammarLogitsProcessor(tables, prompt_len, max_length)`` serves users who call
``model.generate(..., logits_processor=LogitsProcessorList([proc]))`` themselves (greedy or beam,
batched). At each call it needs the state of every row of ``input_ids``. Rows get reordered by
beam search and assisted / prompt-lookup decoding calls it on candidate prefixes, so states are
kept per prefix: a snapshot (ids, states) for each recent length. A row is matched to a
snapshot row with the same prefix (a polynomial hash of the prefix, then an exact check) and
advanced over the tokens after it; rows without a match are recomputed from the prompt. Masked
tokens get -inf; after "|" each row is renormalised over its candidates (a log-softmax over C_t,
the distribution the constrained loss trains), so beam search ranks trees on the trained
probabilities rather than on a full-vocabulary normaliser.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from conslu.constraints import MIN_NEW_TOKENS, TRANSCRIPT, State, Tables, advance, candidate_mask, init_state
from conslu.context import encode

if TYPE_CHECKING:  # pragma: no cover
    from conslu.model import ConSLU

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode. ``constrained=None``: the model folder's setting; ``speculative``: copy-speculative
    drafts in greedy search (same output, fewer decoder passes); ``max_new_tokens``: generated tokens
    after the prompt, <|endoftext|> included (None: ``DEFAULT_MAX_NEW_TOKENS``, capped by the decoder's
    positions); ``length_penalty``: beam ranking, 0 = the sum of log-probs (the joint probability of
    transcript and tree; the search stops exactly when no live hypothesis can win), None = sum / length
    (openai/whisper's default), else over ``((5 + length) / 6) ** length_penalty``; ``language``/``task``: the prompt of a
    multilingual checkpoint (None: English transcription, as ConSLU models are trained);
    ``loop_guard``: cut transcripts that loop (``conslu.guard``)."""

    beam_size: int = 1
    constrained: bool | None = None
    speculative: bool = True
    max_new_tokens: int | None = None
    length_penalty: float | None = 0.0
    language: str | None = None
    task: str | None = None
    loop_guard: bool = True

    def __post_init__(self) -> None:
        if int(self.beam_size) < 1:
            raise ValueError(f"beam size must be >= 1, got {self.beam_size}")
        if self.max_new_tokens is not None and int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def replace(self, **changes: Any) -> "DecodingOptions":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve(slu: "ConSLU", options: DecodingOptions) -> tuple[list[int], int, bool]:
    """(prompt ids, max_new_tokens, constrained) of ``options`` for ``slu``; a clear error when the
    length budget cannot close a tree or the prompt does not fit."""
    prompt = slu.tokenizer.prefix_ids if options.language is None and options.task is None \
        else slu.tokenizer.prompt_ids(options.language, options.task)
    constrained = slu.decode_constrained if options.constrained is None else bool(options.constrained)
    if constrained and slu.target_format != "simplified":
        raise ValueError("constrained decoding needs the simplified target format")
    limit = int(slu.model.config.max_target_positions) - len(prompt)
    max_new = options.max_new_tokens
    if max_new is None:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, limit)
    max_new = int(max_new)
    if max_new > limit:
        raise ValueError(f"max_new_tokens {max_new} does not fit: the decoder has {limit} positions after the {len(prompt)}-token prompt")
    if constrained and max_new < MIN_NEW_TOKENS:
        raise ValueError(f"max_new_tokens {max_new} is too small to close a tree: constrained decoding needs at least "
                         f"{MIN_NEW_TOKENS} (\"| [ IN:X ] <|endoftext|>\")")
    return prompt, max_new, constrained


def decode_tokens(slu: "ConSLU", options: DecodingOptions = DecodingOptions(), *, input_features: Tensor | None = None,
                  encoder_hidden: Tensor | None = None, stats: dict | None = None,
                  exact_lengths: Sequence[int] | None = None, stop_at_separator: bool = False,
                  draft_len: int | None = None) -> list[list[int]]:
    """Token rows (prompt + generated) for log-mel ``input_features`` [B, mels, frames] or encoder
    outputs ``encoder_hidden`` [B, frames, d]. ``stats`` (a dict) receives the search's counters.
    ``exact_lengths``, ``stop_at_separator`` and ``draft_len`` are for benchmarks (see ``DecodingTask``)."""
    from conslu.search import DecodingTask
    from conslu.speculative import DRAFT_LEN, default_draft_budget

    prompt, max_new, constrained = resolve(slu, options)
    model = slu.model
    model.eval()
    with torch.inference_mode():
        if encoder_hidden is None:
            if input_features is None:
                raise ValueError("decode needs input_features or encoder_hidden")
            encoder_hidden = encode(model.get_encoder(), input_features)
        greedy = options.beam_size == 1
        speculative = greedy and options.speculative and slu.tables is not None
        k = (DRAFT_LEN if draft_len is None else int(draft_len)) if speculative else 0
        task = DecodingTask(model, slu.tables, prompt, max_new_tokens=max_new, constrained=constrained,
                            beam_size=options.beam_size, length_penalty=options.length_penalty,
                            draft_len=k, prior=slu.label_drafter if k else None,
                            draft_budget=default_draft_budget(encoder_hidden.device), loop_guard=options.loop_guard,
                            eos_id=slu.tokenizer.eos_token_id, pad_id=slu.tokenizer.pad_token_id,
                            exact_lengths=exact_lengths, stop_at_separator=stop_at_separator)
        rows = task.run(encoder_hidden)
    if stats is not None:
        stats.update(task.stats)
    return rows


def decode(slu: "ConSLU", options: DecodingOptions = DecodingOptions(), *, input_features: Tensor | None = None,
           encoder_hidden: Tensor | None = None, stats: dict | None = None) -> list[dict]:
    """Decoded results (``ConSLU.result``: transcript, logical_form, valid, text) of a batch."""
    rows = decode_tokens(slu, options, input_features=input_features, encoder_hidden=encoder_hidden, stats=stats)
    return [slu.result(r) for r in rows]


_HASH_SEED = 0x5EED


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token outside C_t and renormalises tree steps over it. ``prompt_len``: decoder
    prompt tokens before the target; ``max_length``: total length limit (prompt + max_new_tokens)
    for the closing budget, or None."""

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
        scores = scores.masked_fill(~mask, float("-inf"))
        tree = (state.phase != TRANSCRIPT)[:, None]
        return torch.where(tree, torch.log_softmax(scores.float(), -1).to(scores.dtype), scores)
