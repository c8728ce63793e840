"""The decoding loop: greedy (with copy-speculative drafts) and beam search over a Whisper decoder.

``DecodingTask`` runs a batch from encoder outputs with the KV cache, in the spirit of
openai/whisper's ``DecodingTask``: the same prompt, Whisper suppress lists, constraint masks,
length budget and loop guard for every search, one ``run`` loop and short steps.

Greedy: each pass feeds every row's pending token plus its drafted tokens (``conslu.speculative``;
none without speculation), takes the masked argmax after each (``select``), keeps the drafts that
equal it plus the model's own next token (``accept``), and drops cache slots that no row needs
(``trim_cache``). Rows accept different numbers of tokens: each keeps its own positions, and
rejected draft slots stay in the shared cache as "holes" masked out by a 2-D attention mask.
Speculation is lossless: every kept token is the argmax of exactly the logits plain greedy sees
(up to floating-point noise of a multi-token pass, as in any speculative decoder).

Beam search: ``beam_size`` hypotheses per utterance, ranked on the trained distribution: in the
transcript the log-softmax over the whole vocabulary (the loss there is plain cross-entropy), after
"|" the log-softmax over the candidate set C_t (the constrained loss, Eq. 2). Finished hypotheses
are ranked by their summed log-prob (``length_penalty`` 0: the search stops once no live hypothesis
can beat the best finished one, since log-probs only lower a sum), by sum / length (None) or over
``((5 + length) / 6) ** length_penalty``; with a length-normalised ranking the search stops when
``beam_size`` hypotheses have finished (openai/whisper's rule).

Loop guard (``conslu.guard``): a transcript that starts to loop is cut back to its first copy (its
cache slots become holes) and "|" is forced, in both searches.
"""

from __future__ import annotations

import inspect
import time
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from conslu.constraints import DONE, TRANSCRIPT, State, Tables, advance, candidate_mask, init_state
from conslu.guard import repeated_tail
from conslu.speculative import LabelDrafter, draft_tokens

TIE_TOL = 1e-4  # compact-projection margins below this (relative) are re-checked with a full-vocabulary row


def tie_tolerance(dtype: torch.dtype) -> float:
    """The relative margin under which a compact projection is re-checked: ``TIE_TOL`` in fp32, four
    units in the last place of a half-precision dtype (a gathered dot product and the full matmul
    may round differently by a few of them)."""
    return max(TIE_TOL, 4.0 * torch.finfo(dtype).eps)


@lru_cache(maxsize=None)
def cache_kwarg(cls: type) -> str:
    """The KV-cache argument of a transformers forward: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def candidate_projection_ok(model: Any) -> bool:
    """True when ``model``'s forward is the stock Whisper one (decoder body + bias-free ``proj_out``),
    so the loop may run the decoder body itself and project only candidate rows."""
    from transformers import WhisperForConditionalGeneration

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (isinstance(model, WhisperForConditionalGeneration)
            and type(model).forward is WhisperForConditionalGeneration.forward
            and out is not None and getattr(out, "bias", None) is None)


def suppress_lists(model: Any) -> tuple[list[int], list[int]]:
    """Whisper's ``suppress_tokens`` and ``begin_suppress_tokens`` from the generation config."""
    gc = getattr(model, "generation_config", None)
    return list(getattr(gc, "suppress_tokens", None) or []), list(getattr(gc, "begin_suppress_tokens", None) or [])


def _stack_states(states: list[State]) -> State:
    """K states of N rows -> one State of N*K rows, row-major (row b, step j at b*K + j)."""
    out = {}
    for name in ("phase", "depth", "top", "ptr", "tlen", "stack", "wpos"):
        vals = [getattr(s, name) for s in states]
        out[name] = None if vals[0] is None else torch.stack(vals, 1).flatten(0, 1)
    return State(**out)


class DecodingTask:
    """One batch, one search. ``prompt``: the decoder prompt ids; ``max_new_tokens``: generated
    tokens after it, <|endoftext|> included; ``tables``: constraint tables (None for targets
    without them, e.g. WhiSLU JSON); ``constrained``: apply the candidate sets; ``draft_len``:
    speculative drafts per pass (0: none; greedy only), capped at ``draft_budget // batch``;
    ``exact_lengths`` (benchmarks): row i generates exactly that many tokens, <|endoftext|> does not
    stop it; ``stop_at_separator`` (benchmarks): a row also finishes at "|"."""

    def __init__(self, model: Any, tables: Tables | None, prompt: Sequence[int], *, max_new_tokens: int,
                 constrained: bool = True, beam_size: int = 1, length_penalty: float | None = 0.0,
                 draft_len: int = 0, prior: LabelDrafter | None = None, draft_budget: int | None = None,
                 loop_guard: bool = True, suppress: bool = True, eos_id: int, pad_id: int,
                 exact_lengths: Sequence[int] | None = None, stop_at_separator: bool = False,
                 project: bool | None = None) -> None:
        self.model = model
        self.tables = tables
        self.prompt = list(prompt)
        self.P = len(self.prompt)
        self.max_len = self.P + int(max_new_tokens)
        limit = int(getattr(model.config, "max_target_positions", self.max_len))
        if self.max_len > limit:
            raise ValueError(f"prompt ({self.P}) + max_new_tokens ({max_new_tokens}) exceeds the decoder's {limit} positions")
        self.limit = limit
        self.constrained = bool(constrained) and tables is not None
        self.beam_size = int(beam_size)
        self.length_penalty = length_penalty
        self.draft_len = max(int(draft_len), 0) if tables is not None and self.beam_size == 1 else 0
        self.prior = prior
        self.draft_budget = draft_budget
        self.loop_guard = loop_guard
        self.eos, self.pad = int(eos_id), int(pad_id)
        self.cut_token = tables.sep_id if tables is not None else self.eos  # what ends a looping transcript
        self.exact_lengths = exact_lengths
        self.stop_at_separator = stop_at_separator
        self.fast = candidate_projection_ok(model) if project is None else bool(project)
        self.sup, self.begin = suppress_lists(model) if suppress else ([], [])
        self.stats = {"decoder_passes": 0, "tokens": 0, "drafted": 0, "accepted": 0, "lf_passes": 0, "lf_tokens": 0,
                      "full_rows": 0, "compact_rows": 0, "compact_cols": 0, "near_ties": 0, "max_drafts": 0,
                      "forced_eos": 0, "loops_cut": 0}

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self, enc: Tensor, rows: int) -> None:
        device = enc.device
        self.device = device
        if self.tables is not None and self.tables.device != device:
            self.tables = self.tables.to(device)
        if self.prior is not None:
            self.prior = self.prior.to(device)
        V = self.tables.vocab_size if self.tables is not None else self.model.get_output_embeddings().weight.shape[0]
        self.V = V
        self.sup_t = torch.tensor([t for t in self.sup if 0 <= t < V], dtype=torch.long, device=device)
        self.begin_t = torch.tensor([t for t in self.begin if 0 <= t < V], dtype=torch.long, device=device)
        self.enc = enc
        self.decoder = self.model.get_decoder() if self.fast else None
        self.weight = self.model.get_output_embeddings().weight
        self.tie_tol = tie_tolerance(self.weight.dtype)
        self.cache: Any = None
        self.R = rows
        width = self.max_len + self.draft_len + 1  # the last column is a write sink
        self.ids = torch.full((rows, width), self.pad, dtype=torch.long, device=device)
        self.ids[:, : self.P] = torch.tensor(self.prompt, dtype=torch.long, device=device)
        self.n = torch.full((rows,), self.P, dtype=torch.long, device=device)  # committed tokens per row
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.force = torch.zeros(rows, dtype=torch.bool, device=device)  # next token is the cut token
        self.keep = torch.ones(rows, 0, dtype=torch.bool, device=device)  # valid KV-cache slots
        tables = self.tables
        self.state = init_state(rows, tables, device).fit(width - self.P) if tables is not None else None
        self.row_max = torch.full((rows,), self.max_len, dtype=torch.long, device=device)
        if self.exact_lengths is not None:
            ex = list(self.exact_lengths)
            if len(ex) != rows or min(ex) < 1 or max(ex) > self.max_len - self.P:
                raise ValueError(f"exact_lengths must be {rows} values in 1..{self.max_len - self.P}")
            self.row_max = torch.tensor([self.P + int(x) for x in ex], dtype=torch.long, device=device)

    @property
    def seq(self) -> Tensor:
        return self.ids[:, self.P:]

    def _in_transcript(self) -> Tensor:
        return self.state.phase == TRANSCRIPT if self.state is not None else torch.ones_like(self.done)

    # -- the decoder ------------------------------------------------------------------------------
    def forward(self, q: Tensor, pos: Tensor, keep: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """One decoder pass over q [R, K] at positions pos; (hidden [R, K, d], None) on the fast
        path, (None, logits [R, K, V']) otherwise."""
        mask = None if bool(keep.all()) else keep.long()
        self.stats["decoder_passes"] += 1
        if self.fast:
            out = self.decoder(input_ids=q, attention_mask=mask, encoder_hidden_states=self.enc, position_ids=pos,
                               use_cache=True, **{cache_kwarg(type(self.decoder)): self.cache})
            self.cache = out_cache(out)
            return out.last_hidden_state, None
        out = self.model(encoder_outputs=(self.enc,), decoder_input_ids=q, decoder_position_ids=pos,
                         decoder_attention_mask=mask, use_cache=True, **{cache_kwarg(type(self.model)): self.cache})
        self.cache = out_cache(out)
        return None, out.logits

    def masks(self, st: State, seq: Tensor, offsets: Tensor) -> Tensor | None:
        """Candidate masks [N, V] of N states (None when unconstrained); ``offsets`` [N]: committed
        length before each position, for the length budget."""
        if not self.constrained:
            return None
        return candidate_mask(st, seq, self.tables, decoding=True, remaining=self.max_len - offsets)

    # -- greedy ---------------------------------------------------------------------------------
    def select(self, hidden: Tensor | None, logits: Tensor | None, cm: Tensor | None, phase: Tensor,
               at_begin: Tensor) -> Tensor:
        """Greedy token [N] for N positions: argmax over the allowed tokens (lowest id among equal maxima).

        With full ``logits`` it masks and takes the argmax. With ``hidden`` ([..., d], decoder body
        output) it projects full-vocabulary rows (as ``proj_out``) for positions without constraints
        or still in the transcript, and for logical-form positions only the union U of their
        candidate ids (U ascending, so ties break the same way). A gathered dot product may differ
        from the full matmul in the last bits, so a position whose two best candidates are within
        :func:`tie_tolerance` (relative, by dtype) is recomputed from its full row.
        """
        V, stats, sup_t = self.V, self.stats, self.sup_t
        if logits is not None:
            scores = logits.reshape(-1, logits.shape[-1])[:, :V].float()
            if scores.shape[-1] < V:
                raise ValueError(f"model has {scores.shape[-1]} logits; the constraint tables were built for {V}")
            return self._masked(scores, cm, at_begin).argmax(-1)
        weight = self.weight
        h = hidden.reshape(-1, hidden.shape[-1])
        N = h.shape[0]
        if weight.shape[0] < V:
            raise ValueError(f"model has {weight.shape[0]} logits; the constraint tables were built for {V}")
        full_rows = torch.ones(N, dtype=torch.bool, device=h.device) if cm is None else (phase == TRANSCRIPT) | at_begin
        out = torch.empty(N, dtype=torch.long, device=h.device)
        idx = None if bool(full_rows.all()) else (~full_rows).nonzero().squeeze(1)
        if idx is None or idx.numel() < N:
            fr = full_rows.nonzero().squeeze(1) if idx is not None else None
            hf = h if fr is None else h.index_select(0, fr)
            scores = F.linear(hf, weight)[:, :V].float()
            g = self._masked(scores, None if cm is None else (cm if fr is None else cm.index_select(0, fr)),
                             at_begin if fr is None else at_begin.index_select(0, fr)).argmax(-1)
            stats["full_rows"] += int(hf.shape[0])
            if fr is None:
                return g
            out[fr] = g
        if idx is not None:
            c = cm.index_select(0, idx)
            if sup_t.numel():
                c[:, sup_t] = False
            u = c.any(0).nonzero().squeeze(1)  # ascending candidate ids
            hc = h.index_select(0, idx)
            stats["compact_rows"] += int(idx.numel())
            stats["compact_cols"] += int(u.numel())
            if u.numel() == 0:
                near = torch.ones(idx.numel(), dtype=torch.bool, device=h.device)
                gc = torch.zeros(idx.numel(), dtype=torch.long, device=h.device)
            else:
                sc = F.linear(hc, weight.index_select(0, u)).float().masked_fill(~c.index_select(1, u), float("-inf"))
                if u.numel() > 1:
                    top = sc.topk(2, dim=1).values
                    near = torch.isfinite(top[:, 1]) & ((top[:, 0] - top[:, 1]) <= self.tie_tol * top[:, 0].abs().clamp(min=1.0))
                else:
                    near = torch.zeros(idx.numel(), dtype=torch.bool, device=h.device)
                near |= ~torch.isfinite(sc.max(1).values)
                gc = u[sc.argmax(-1)]
            if bool(near.any()):
                rows = near.nonzero().squeeze(1)
                stats["near_ties"] += int(rows.numel())
                for r in rows.tolist():  # rare: one full row each, the shape plain greedy uses
                    s = F.linear(hc[r : r + 1], weight)[:, :V].float().masked_fill(~c[r : r + 1], float("-inf"))
                    gc[r] = s.argmax(-1)[0]
            out[idx] = gc
        return out

    def _masked(self, scores: Tensor, cm: Tensor | None, at_begin: Tensor) -> Tensor:
        """Scores with disallowed tokens at -inf: candidate masks, Whisper's suppress lists."""
        if cm is not None:
            scores = scores.masked_fill(~cm, float("-inf"))
        if self.sup_t.numel():
            scores[:, self.sup_t] = float("-inf")
        if self.begin_t.numel() and bool(at_begin.any()):
            scores[:, self.begin_t] = scores[:, self.begin_t].masked_fill(at_begin[:, None], float("-inf"))
        return scores

    def draft(self) -> tuple[list[Tensor], list[Tensor], list[State]]:
        """Drafted tokens per row (``conslu.speculative.draft_tokens``), their validity and the state after each."""
        k = self.draft_len
        if self.draft_budget is not None and k:
            k = min(k, max(1, int(self.draft_budget) // self.R))
        if not k:
            return [], [], [self.state]
        live = ~self.done & (self.state.phase != TRANSCRIPT)
        room = (self.row_max - self.n - 1).clamp(min=0)
        last = self.ids.gather(1, (self.n - 1)[:, None]).squeeze(1)
        return draft_tokens(self.state, self.seq, self.tables, self.prior, last, live, room, k, self.pad)

    def accept(self, g: Tensor, drafts: list[Tensor], dvalid: list[Tensor], states: list[State]) -> Tensor:
        """Commit, per row, the drafts that equal the argmax before them plus the model's own next
        token (stopping after <|endoftext|>); returns the number of new tokens per row."""
        B, K = g.shape
        device = g.device
        stats = self.stats
        if K > 1:
            d = torch.stack(drafts, 1)
            valid = torch.stack(dvalid, 1)
            m = ((d == g[:, :-1]) & valid).long().cumprod(1).sum(1)
            stats["drafted"] += int(valid.sum())
        else:
            m = torch.zeros(B, dtype=torch.long, device=device)
        j = torch.arange(K, device=device)[None]
        take = (j <= m[:, None]) & ~self.done[:, None]
        ends = (g == self.eos) | ((g == self.cut_token) if self.stop_at_separator else False)
        if self.exact_lengths is not None:
            ends = torch.zeros_like(ends)
        ends &= take
        end_at = torch.where(ends.any(1), ends.to(torch.uint8).argmax(1), K)
        take &= j <= end_at[:, None]
        take &= (self.n[:, None] + j) < self.row_max[:, None]
        cnt = take.sum(1)
        in_tr = self._in_transcript()
        stats["accepted"] += int((cnt - 1).clamp(min=0).sum())
        stats["tokens"] += int(cnt.sum())
        stats["lf_tokens"] += int(torch.where(~in_tr, cnt, 0).sum())
        cols = torch.where(take, self.n[:, None] + j, self.ids.shape[1] - 1)
        self.ids.scatter_(1, cols, torch.where(take, g, self.pad))
        self.ids[:, -1] = self.pad
        if self.state is not None:
            last = (cnt - 1).clamp(min=0)
            sm = _stack_states(states).index(torch.arange(B, device=device) * K + last) if K > 1 else self.state
            moved = advance(sm, g.gather(1, last[:, None]).squeeze(1), self.seq, self.tables)
            self.state = moved.where(cnt > 0, self.state)
        self.n = self.n + cnt
        self.done = self.done | ends.any(1) | (self.n >= self.row_max)
        return cnt

    def forced_end(self) -> None:
        """A closed tree allows only <|endoftext|> (= pad): append it without another decoder pass."""
        if not (self.constrained and self.pad == self.eos) or self.exact_lengths is not None:
            return  # (exact lengths: the row goes on, <|endoftext|> being its only candidate)
        fin = ~self.done & (self.state.phase == DONE) & (self.n < self.row_max)
        if bool(fin.any()):
            self.ids.scatter_(1, torch.where(fin, self.n, self.ids.shape[1] - 1)[:, None], self.eos)
            self.ids[:, -1] = self.pad
            self.n = self.n + fin.long()
            self.done = self.done | fin
            for key in ("tokens", "lf_tokens", "forced_eos"):
                self.stats[key] += int(fin.sum())

    def trim_cache(self) -> None:
        """Crop trailing cache slots that no row needs."""
        tail = int((~self.keep).flip(1).to(torch.uint8).cumprod(1).sum(1).min()) if self.keep.shape[1] else 0
        if tail:
            self.cache.crop(-tail)
            self.keep = self.keep[:, : self.keep.shape[1] - tail]

    # -- loop guard -----------------------------------------------------------------------------
    def guard(self) -> Tensor:
        """Cut looping transcripts back to their first copy and force the cut token next; returns
        the number of tokens dropped per row."""
        zero = torch.zeros_like(self.n)
        if not self.loop_guard:
            return zero
        live = ~self.done & self._in_transcript() & ~self.force
        if not bool(live.any()):
            return zero
        drop = torch.where(live, repeated_tail(self.ids, self.n, self.P), 0)
        if not bool((drop > 0).any()):
            return zero
        cut = drop > 0
        self.stats["loops_cut"] += int(cut.sum())
        # the cache holds the tokens before the pending one: its last `drop` valid slots go
        left = self.keep.flip(1).long().cumsum(1).flip(1)
        self.keep = self.keep & ~(cut[:, None] & (left <= drop[:, None]))
        pos = torch.arange(self.ids.shape[1], device=self.device)[None]
        new_n = self.n - drop
        self.ids = torch.where(cut[:, None] & (pos >= new_n[:, None]), self.pad, self.ids)
        self.n = new_n
        if self.state is not None:
            self.state.tlen = self.state.tlen - drop
        self.force |= cut
        return drop

    def _force_cut(self, g0: Tensor) -> Tensor:
        forced = self.force & ~self.done
        if bool(forced.any()):
            g0 = torch.where(forced, self.cut_token, g0)
            self.force &= ~forced
        return g0

    # -- the searches ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, enc: Tensor) -> list[list[int]]:
        """Token rows (prompt + generated, ending with <|endoftext|> when finished) for encoder
        outputs ``enc`` [B, frames, d]."""
        t0 = time.perf_counter()
        rows = self._beam(enc) if self.beam_size > 1 else self._greedy(enc)
        if enc.device.type == "cuda":
            torch.cuda.synchronize(enc.device)
        self.stats["seconds"] = time.perf_counter() - t0
        return rows

    def _greedy(self, enc: Tensor) -> list[list[int]]:
        B = enc.shape[0]
        self._setup(enc, B)
        device, P = self.device, self.P
        first = True
        lf_start: float | None = None
        while True:
            drafts, dvalid, states = ([], [], [self.state]) if first else self.draft()
            K = 1 + len(drafts)
            self.stats["max_drafts"] = max(self.stats["max_drafts"], K - 1)
            in_lf = bool((~self._in_transcript()).any())
            if lf_start is None and not first and in_lf:
                lf_start = time.perf_counter()
            if first:
                q = self.ids[:, :P]
                pos = torch.arange(P, device=device).expand(B, P)
                qvalid = torch.ones(B, P, dtype=torch.bool, device=device)
            else:
                q = torch.cat([self.ids.gather(1, (self.n - 1)[:, None])] + [d[:, None] for d in drafts], 1)
                pos = ((self.n - 1)[:, None] + torch.arange(K, device=device)[None]).clamp(max=self.limit - 1)
                qvalid = torch.cat([~self.done[:, None]] + [v[:, None] for v in dvalid], 1)
                q = torch.where(qvalid, q, self.pad)
            new_keep = torch.cat([self.keep, qvalid], 1)
            hidden, logits = self.forward(q, pos, new_keep)
            if first:
                hidden = None if hidden is None else hidden[:, -1:]
                logits = None if logits is None else logits[:, -1:]
            if in_lf:
                self.stats["lf_passes"] += 1
            offsets = (self.n[:, None] + torch.arange(K, device=device)[None]).reshape(-1)
            st = _stack_states(states) if K > 1 else states[0]
            seq = self.seq.repeat_interleave(K, 0) if K > 1 else self.seq
            cm = self.masks(st, seq, offsets) if st is not None else None
            phase = st.phase if st is not None else torch.full_like(offsets, TRANSCRIPT)
            g = self.select(hidden, logits, cm, phase, offsets == P).view(B, K)
            g[:, 0] = self._force_cut(g[:, 0])
            cnt = self.accept(g, drafts, dvalid, states)
            self.forced_end()
            used = qvalid if first else (torch.arange(K, device=device)[None] < cnt[:, None]) & qvalid
            self.keep = torch.cat([self.keep, used], 1)
            self.guard()
            self.trim_cache()
            first = False
            if bool(self.done.all()):
                break
        self.stats["lf_seconds"] = 0.0 if lf_start is None else time.perf_counter() - lf_start
        return [self.ids[b, : int(self.n[b])].tolist() for b in range(B)]

    def logprobs(self, logits: Tensor, at_begin: Tensor) -> Tensor:
        """[R, V] log-probabilities of the next token on the trained distribution, disallowed tokens -inf."""
        scores = logits[:, : self.V].float()
        cm = self.masks(self.state, self.seq, self.n) if self.state is not None else None
        allowed = self._masked(torch.zeros_like(scores), cm, at_begin) == 0
        full = torch.log_softmax(scores, -1).masked_fill(~allowed, float("-inf"))
        if cm is None:
            return full
        tree = (self.state.phase != TRANSCRIPT)[:, None]
        out = torch.where(tree, torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), -1), full)
        return out.nan_to_num(nan=float("-inf"))  # a dead row has no candidate: log_softmax gives NaN

    def _rank(self, total: float, length: int) -> float:
        lp = self.length_penalty
        return total / (length if lp is None else ((5 + length) / 6) ** lp)

    def _settled(self, finished: list[tuple[float, float, list[int]]], best_live: float) -> bool:
        """Whether an utterance's search may stop. Ranked by the plain sum (``length_penalty`` 0),
        no live hypothesis can beat the best finished one once its sum is lower (log-probs only
        decrease it): stop then. Ranked per length, openai/whisper's rule: ``beam_size`` finished."""
        if self.length_penalty == 0:
            return bool(finished) and max(f[1] for f in finished) >= best_live
        return len(finished) >= self.beam_size

    def _beam(self, enc: Tensor) -> list[list[int]]:
        B, K = enc.shape[0], self.beam_size
        R = B * K
        self._setup(enc.repeat_interleave(K, 0), R)
        device, P, V = self.device, self.P, self.V
        score = torch.full((R,), float("-inf"), device=device)
        score[::K] = 0.0
        tok_lp = torch.zeros(R, self.ids.shape[1], device=device)
        finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]
        closed = [False] * B
        first = True
        while True:
            if first:
                q, pos = self.ids[:, :P], torch.arange(P, device=device).expand(R, P)
                qvalid = torch.ones(R, P, dtype=torch.bool, device=device)
            else:
                q, pos = self.ids.gather(1, (self.n - 1)[:, None]), (self.n - 1)[:, None]
                qvalid = torch.ones(R, 1, dtype=torch.bool, device=device)
            hidden, logits = self.forward(q, pos, torch.cat([self.keep, qvalid], 1))
            self.keep = torch.cat([self.keep, qvalid], 1)
            if logits is None:
                logits = F.linear(hidden[:, -1], self.weight)
            else:
                logits = logits[:, -1]
            logp = self.logprobs(logits, self.n == P)
            forced = self.force
            if bool(forced.any()):
                only = torch.full_like(logp, float("-inf"))
                only[:, self.cut_token] = 0.0
                logp = torch.where(forced[:, None], only, logp)
                self.force = torch.zeros_like(self.force)
            top_s, top_i = (score[:, None] + logp).view(B, K * V).topk(2 * K, dim=1)
            src = torch.arange(R, device=device)
            new_tok = torch.full((R,), self.pad, dtype=torch.long, device=device)
            new_score = torch.full((R,), float("-inf"), device=device)
            lens = self.n.tolist()
            for b, (ss, ii) in enumerate(zip(top_s.tolist(), top_i.tolist())):
                if closed[b]:
                    continue
                kept = 0
                for s, i in zip(ss, ii):
                    if s == float("-inf") or kept == K:
                        break
                    r, t = b * K + i // V, i % V
                    if t == self.eos or lens[r] + 1 >= self.max_len:
                        body = self.ids[r, P: lens[r]].tolist() + [t]
                        finished[b].append((self._rank(s, len(body) - (t == self.eos)), s, body))
                        continue
                    src[b * K + kept], new_tok[b * K + kept], new_score[b * K + kept] = r, t, s
                    kept += 1
                if kept == 0 or self._settled(finished[b], float(new_score[b * K])):
                    closed[b] = True
            if all(closed):
                break
            lp_new = logp[src, new_tok]
            self.ids, self.n, tok_lp = self.ids[src], self.n[src], tok_lp[src]
            self.keep, self.force = self.keep[src], self.force[src]
            self.state = self.state.index(src) if self.state is not None else None
            # beams only move within their utterance, whose cross-attention keys/values are the same
            getattr(self.cache, "self_attention_cache", self.cache).reorder_cache(src)
            rows = torch.arange(R, device=device)
            alive = torch.isfinite(new_score)  # rows of finished utterances stay where they are
            cols = torch.where(alive, self.n, self.ids.shape[1] - 1)
            self.ids[rows, cols] = torch.where(alive, new_tok, self.pad)
            self.ids[:, -1] = self.pad
            tok_lp[rows, cols] = torch.where(alive, lp_new, 0.0)
            tok_lp[:, -1] = 0.0
            if self.state is not None:
                self.state = advance(self.state, new_tok, self.seq, self.tables)
            self.n = self.n + alive.long()
            score = new_score
            self.done = ~torch.isfinite(score)
            drop = self.guard()
            if bool((drop > 0).any()):
                pos_all = torch.arange(self.ids.shape[1], device=device)[None]
                gone = (pos_all >= self.n[:, None]) & (pos_all < (self.n + drop)[:, None])
                score = score - (tok_lp * gone).sum(1)
                tok_lp = tok_lp.masked_fill(gone, 0.0)
            self.trim_cache()
            self.stats["tokens"] += int(torch.isfinite(score).sum())
            first = False
        out = []
        for b in range(B):
            best = max(finished[b], key=lambda x: x[0]) if finished[b] else (0.0, 0.0, [])
            out.append(self.prompt + best[2])
            self.stats.setdefault("beam_scores", []).append(best[1])
        return out
