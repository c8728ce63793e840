"""Copy-speculative greedy decoding: draft the predictable logical-form tokens, verify them in one pass.

After "|" most of a ConSLU output is predictable from what is already decoded: "[" after "|",
after "[" a label of the grammar (``LabelDrafter``: one whose name words occur in the transcript,
else the most frequent under the open parent), the transcript tokens after
the copy pointer inside a slot, "]" once the transcript is used up, <|endoftext|> when the tree
closes. ``speculative_generate`` runs its own batched greedy loop over a
``WhisperForConditionalGeneration`` (encoder once, decoder with the KV cache): at every step it
drafts up to ``draft_len`` tokens per row by running the constraint state machine forward on the
draft (``constraints.advance``), feeds [last token, draft] in ONE decoder call, applies the
candidate mask of the state after each drafted prefix (one vectorised ``candidate_mask`` over
B x K states) and keeps, per row, the drafted tokens that equal the argmax of the masked logits
plus the model's own next token. Lossless: every kept token is the argmax of exactly the logits
plain constrained greedy would see (up to floating-point noise of a multi-token pass, as in any
speculative decoder), so the output is the same as ``model.generate`` with
``GrammarLogitsProcessor`` and the same Whisper suppress lists.

Batching: rows accept different numbers of tokens. Each row keeps its own logical positions
(``decoder_position_ids``); rejected draft slots stay in the shared KV cache but are masked out
by a 2-D ``decoder_attention_mask`` ("holes"), and the trailing slots no row needs are cropped
(``Cache.crop``, as transformers' assisted decoding does), so with batch 1 there are never holes.
The price of holes is a few wasted cache slots per step, not lost acceptance (accepting the
minimum over rows would throw away most of the gain once rows drift apart).

``draft_len=0`` gives the same loop without drafts (the fair non-speculative baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from conslu.constraints import BODY, DONE, LABEL, OPEN, TRANSCRIPT, State, Tables, advance, candidate_mask, init_state

if TYPE_CHECKING:  # pragma: no cover
    from conslu.tokenizer import SLUTokenizer

DRAFT_LEN = 8  # most drafted tokens per pass (6-10 are within a few % of each other on the demo outputs)
# On a CPU a pass is compute-bound once batch x positions grows: drafts per row are capped at
# CPU_DRAFT_BUDGET // batch (at least 1). Measured on 2 cores with tiny.en (whole decode, vs no
# drafts): batch 16 with 8 drafts 0.95x, with 1 draft 1.02x; batch 8 with 2 drafts 0.99x; batch 4
# with 4 drafts 1.13x; batch 2 with 8 drafts 1.17x.
CPU_DRAFT_BUDGET = 16


def default_draft_budget(device: Any) -> int | None:
    """The ``draft_budget`` for decoding on ``device``: ``CPU_DRAFT_BUDGET`` on CPU, none on GPU."""
    return CPU_DRAFT_BUDGET if torch.device(device).type == "cpu" else None


@dataclass
class LabelDrafter:
    """Label drafts after "[": the most frequent child under the open parent (grammar training counts),
    preferring intents whose name words occur in the row's transcript ("set an alarm" -> IN:*_ALARM,
    then the most frequent of those: IN:CREATE_ALARM). A wrong guess costs the draft after it.

    On the demo eval outputs the intent guess is right for 67 of 90 utterances, against 31 for
    the most frequent intent alone. Slot names mislead ("alarm" in the transcript is rarely
    SL:ALARM_NAME), so slots use the counts only: 322 passes on those 90 logical forms, against 346
    with slot names too.
    """

    token_ids: Tensor  # [n_labels] label token ids; label i is parent index i + 1
    score: Tensor  # [n_parents, n_labels] float: training count of the child under the parent, -inf if not allowed
    name_tokens: Tensor  # [n_labels, W] token ids of the label's name words (and plurals), -1 padding

    def to(self, device: Any) -> "LabelDrafter":
        return LabelDrafter(*(getattr(self, f.name).to(device) for f in fields(self)))

    def hits(self, seq: Tensor, tlen: Tensor, ptr: Tensor | None = None) -> Tensor:
        """[N, n_labels] long: how many of each label's name tokens occur in the row's transcript
        (after position ``ptr`` when given: the words not copied yet, where a next slot can be)."""
        N, L = seq.shape
        V = int(max(int(self.name_tokens.max()) + 1, 1))
        present = torch.zeros(N, V + 1, dtype=torch.bool, device=seq.device)
        if L:
            pos = torch.arange(L, device=seq.device)
            where = (pos[None] < tlen[:, None]) & (seq < V) & (seq >= 0)
            if ptr is not None:
                where &= pos[None] > ptr[:, None]
            cols = torch.where(where, seq, V)
            present.scatter_(1, cols, True)
        names = torch.where(self.name_tokens >= 0, self.name_tokens, V)  # padding -> the always-False column
        present[:, V] = False
        return present[:, names].sum(-1)  # [N, n_labels, W] -> [N, n_labels]

    def draft(self, top: Tensor, hits: Tensor) -> tuple[Tensor, Tensor]:
        """(label token [N], usable [N]) for rows whose open parent is ``top``."""
        score = self.score[top] + hits.to(self.score.dtype) * 1e9
        best = score.argmax(1)
        return self.token_ids[best], torch.isfinite(score.gather(1, best[:, None]).squeeze(1))


def label_prior(tokenizer: "SLUTokenizer", tables: Tables) -> LabelDrafter:
    """The ``LabelDrafter`` of a tokenizer's grammar (counts from the grammar; without counts, every
    allowed label counts 1, so the first allowed one wins ties)."""
    grammar = tokenizer.grammar
    counts: dict[str, dict[str, int]] = getattr(grammar, "counts", None) or {}
    labels = list(tables.labels)
    parents = ["ROOT"] + labels
    allowed = tables.grammar_mask.cpu()
    token_ids = torch.tensor([tokenizer.label_ids[lab] for lab in labels], dtype=torch.long)
    score = torch.full((len(parents), len(labels)), float("-inf"))
    for p, name in enumerate(parents):
        seen = counts.get(name) or {}
        for i, lab in enumerate(labels):
            if bool(allowed[p, token_ids[i]]):
                score[p, i] = float(seen.get(lab, 0)) + 1.0
    names: list[list[int]] = []
    for lab in labels:
        ids: list[int] = []
        for word in (lab.split(":", 1)[-1].lower().split("_") if lab.startswith("IN:") else ()):
            for form in (word, word + "s"):
                piece = tokenizer.word_ids(form) if form else []
                if len(piece) == 1 and piece[0] < tables.vocab_size and piece[0] not in ids:
                    ids.append(piece[0])
        names.append(ids)
    width = max([len(x) for x in names] + [1])
    name_tokens = torch.full((len(labels), width), -1, dtype=torch.long)
    for i, ids in enumerate(names):
        name_tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return LabelDrafter(token_ids, score, name_tokens).to(tables.device)


def _draft_step(state: State, seq: Tensor, tables: Tables, prior: LabelDrafter | None,
                last: Tensor, hits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One drafted token per row from its state and its previous token ``last``: (token [N], usable
    [N] bool, copy [N] bool). ``copy``: the token is the transcript token right after the copy
    pointer inside a slot, so the state after it is the same with ``ptr + 1`` (what ``advance``
    computes for it, without running the whole state machine). ``hits``: ``prior.hits`` of the rows
    (computed once per pass).

    Not drafted (the draft ends there and the verifying pass decides): the first word of a slot.
    Where a slot starts in the transcript is the least predictable decision of the tree (words
    outside slots are skipped), and a wrong guess there would waste every drafted token after it;
    on a 2-core CPU a pass over 1 + k tokens costs ~1.3-2x a pass over one, so drafting only what
    is likely to be accepted pays (measured on the demo eval outputs: 1.41 vs 1.17 modelled speed-up).
    """
    phase, top, ptr, tlen = state.phase, state.top, state.ptr, state.tlen
    L = seq.shape[1]
    nxt_pos = ptr + 1
    has_next = nxt_pos < tlen
    nxt = seq.gather(1, nxt_pos.clamp(0, max(L - 1, 0))[:, None]).squeeze(1) if L else torch.zeros_like(ptr)
    slot = tables.is_slot[top]
    in_body = phase == BODY
    tok = torch.full_like(phase, tables.pad_id)
    ok = torch.zeros_like(phase, dtype=torch.bool)
    tok = torch.where(phase == OPEN, tables.open_id, tok)
    ok |= phase == OPEN
    if prior is not None:
        lab, lab_ok = prior.draft(top, prior.hits(seq, tlen, ptr) if hits is None else hits)
        tok = torch.where((phase == LABEL) & lab_ok, lab, tok)
        ok |= (phase == LABEL) & lab_ok
    # inside a slot: continue copying the transcript, close it when the transcript is used up
    tok = torch.where(in_body & slot, torch.where(has_next, nxt, tables.close_id), tok)
    slot_start = in_body & slot & (tables.label_parent[last.clamp(0, tables.vocab_size - 1)] >= 0)
    # inside an intent (decoupled trees have no words there): another slot if words remain, else close
    tok = torch.where(in_body & ~slot, torch.where(has_next, tables.open_id, tables.close_id), tok)
    ok |= in_body & ~slot_start
    tok = torch.where(phase == DONE, tables.eos_id, tok)
    ok |= phase == DONE
    return tok, ok, in_body & slot & has_next & ~slot_start


def _stack_states(states: list[State]) -> State:
    """K states of N rows -> one State of N*K rows, row-major (row b, step j at b*K + j)."""
    out = {}
    for f in fields(State):
        vals = [getattr(s, f.name) for s in states]
        out[f.name] = None if vals[0] is None else torch.stack(vals, 1).flatten(0, 1)
    return State(**out)


def _suppress_lists(model: Any) -> tuple[list[int], list[int]]:
    gc = getattr(model, "generation_config", None)
    sup = list(getattr(gc, "suppress_tokens", None) or [])
    begin = list(getattr(gc, "begin_suppress_tokens", None) or [])
    return sup, begin


TIE_TOL = 1e-4  # compact-projection margins below this (relative) are re-checked with a full-vocabulary row


def _candidate_projection_ok(model: Any) -> bool:
    """True when ``model``'s forward is the stock Whisper one (decoder body + bias-free ``proj_out``),
    so the loop may run the decoder body itself and project only candidate rows. A subclass that
    overrides ``forward`` (tests nudge logits there) gets the ordinary full forward."""
    try:
        from transformers import WhisperForConditionalGeneration
    except ImportError:  # pragma: no cover
        return False
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (isinstance(model, WhisperForConditionalGeneration)
            and type(model).forward is WhisperForConditionalGeneration.forward
            and out is not None and getattr(out, "bias", None) is None)


def _select(hidden: Tensor | None, logits: Tensor | None, weight: Tensor | None, cm: Tensor | None, phase: Tensor,
            at_begin: Tensor, sup_t: Tensor, begin_t: Tensor, V: int, stats: dict) -> Tensor:
    """Greedy token [N] for N positions: argmax over the allowed tokens (lowest id among equal maxima).

    With ``logits`` ([..., V'] full rows, the plain forward) it masks and takes the argmax. With
    ``hidden`` ([..., d], decoder body output) it projects only what is needed: full-vocabulary rows
    (``F.linear(h, W)``, as ``proj_out``) for positions without constraints or still in the transcript
    phase, and for logical-form positions only the union U of their candidate ids (``F.linear(h,
    W[U])``, U ascending so the tie rule is the same). A gathered dot product may differ from the full
    matmul in the last bits, so a position whose best and second-best candidate logits are within
    ``TIE_TOL`` (relative) is recomputed from its full-vocabulary row: the choice is then the one the
    full computation makes.
    """
    if logits is not None:
        scores = logits.reshape(-1, logits.shape[-1])[:, :V].float()
        if scores.shape[-1] < V:
            raise ValueError(f"model has {scores.shape[-1]} logits; the constraint tables were built for {V}")
        if cm is not None:
            scores = scores.masked_fill(~cm, float("-inf"))
        if sup_t.numel():
            scores[:, sup_t] = float("-inf")
        if begin_t.numel() and bool(at_begin.any()):
            scores[:, begin_t] = scores[:, begin_t].masked_fill(at_begin[:, None], float("-inf"))
        return scores.argmax(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    N = h.shape[0]
    if weight.shape[0] < V:
        raise ValueError(f"model has {weight.shape[0]} logits; the constraint tables were built for {V}")
    full_rows = torch.ones(N, dtype=torch.bool, device=h.device) if cm is None else (phase == TRANSCRIPT) | at_begin
    out = torch.empty(N, dtype=torch.long, device=h.device)
    if bool(full_rows.all()):
        idx = None
    else:
        idx = (~full_rows).nonzero().squeeze(1)
    if idx is None or idx.numel() < N:
        fr = full_rows.nonzero().squeeze(1) if idx is not None else None
        hf = h if fr is None else h.index_select(0, fr)
        scores = torch.nn.functional.linear(hf, weight)[:, :V].float()
        if cm is not None:
            scores = scores.masked_fill(~(cm if fr is None else cm.index_select(0, fr)), float("-inf"))
        if sup_t.numel():
            scores[:, sup_t] = float("-inf")
        ab = at_begin if fr is None else at_begin.index_select(0, fr)
        if begin_t.numel() and bool(ab.any()):
            scores[:, begin_t] = scores[:, begin_t].masked_fill(ab[:, None], float("-inf"))
        g = scores.argmax(-1)
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
        if u.numel() == 0:  # nothing allowed: decide as the full masked row does
            near = torch.ones(idx.numel(), dtype=torch.bool, device=h.device)
            gc = torch.zeros(idx.numel(), dtype=torch.long, device=h.device)
        else:
            sc = torch.nn.functional.linear(hc, weight.index_select(0, u)).float()
            sc = sc.masked_fill(~c.index_select(1, u), float("-inf"))
            if u.numel() > 1:
                top = sc.topk(2, dim=1).values
                near = torch.isfinite(top[:, 1]) & ((top[:, 0] - top[:, 1]) <= TIE_TOL * top[:, 0].abs().clamp(min=1.0))
            else:
                near = torch.zeros(idx.numel(), dtype=torch.bool, device=h.device)
            near |= ~torch.isfinite(sc.max(1).values)
            gc = u[sc.argmax(-1)]
        if bool(near.any()):
            rows = near.nonzero().squeeze(1)
            stats["near_ties"] += int(rows.numel())
            for r in rows.tolist():  # rare: one full row each, the shape plain greedy uses
                s = torch.nn.functional.linear(hc[r : r + 1], weight)[:, :V].float()
                s = s.masked_fill(~c[r : r + 1], float("-inf"))
                gc[r] = s.argmax(-1)[0]
        out[idx] = gc
    return out


@torch.inference_mode()
def speculative_generate(model: Any, input_features: Tensor, tables: Tables, prefix_ids: Sequence[int], *,
                         max_new_tokens: int, draft_len: int = DRAFT_LEN, constrained: bool = True,
                         prior: LabelDrafter | None = None, suppress: bool = True,
                         encoder_outputs: Any = None, stop_at_separator: bool = False,
                         project: bool | None = None,
                         exact_lengths: Sequence[int] | None = None,
                         draft_budget: int | None = None) -> tuple[list[list[int]], dict]:
    """Greedy decoding with copy-speculative drafts (``draft_len=0``: plain greedy in the same loop).

    Returns (sequences, stats): each sequence is ``prefix_ids`` + the generated tokens, ending with
    <|endoftext|> when the row finished within ``max_new_tokens``; stats: ``decoder_passes``
    (decoder calls), ``tokens`` (generated tokens, all rows), ``drafted`` and ``accepted`` (draft
    tokens proposed / kept), ``lf_passes`` and ``lf_tokens`` (the same after "|"), ``max_drafts`` (most drafts in one
    pass), ``forced_eos`` (rows finished without a pass: once the tree closes, <|endoftext|> is the
    only candidate).
    ``constrained``: apply the ConSLU candidate sets (as ``GrammarLogitsProcessor`` with
    ``max_length = len(prefix_ids) + max_new_tokens``); ``suppress``: apply the model's Whisper
    ``suppress_tokens`` / ``begin_suppress_tokens`` (as ``model.generate`` does); ``prior``: the
    label drafts (``label_prior``), none drafted when None; ``stop_at_separator``: a row also
    finishes at "|" (transcript-only decoding, for timing); ``exact_lengths``: row i
    generates exactly ``exact_lengths[i]`` tokens and <|endoftext|> does not stop it (benchmarks:
    unconstrained decoding doing the same work, pass for pass, as a constrained run);
    ``draft_budget``: at most ``max(1, draft_budget // batch)`` drafts per row and pass (see
    ``CPU_DRAFT_BUDGET``; None: ``draft_len``). ``stats["lf_seconds"]``: wall time from
    the first pass in which a row is past "|" to the end (the logical-form part, exact for batch 1).
    """
    device = input_features.device if encoder_outputs is None else next(model.parameters()).device
    tables = tables.to(device) if tables.device != device else tables
    if prior is not None:
        prior = prior.to(device)
    B = int(input_features.shape[0]) if encoder_outputs is None else int(encoder_outputs[0].shape[0])
    P = len(prefix_ids)
    max_len = P + int(max_new_tokens)
    limit = int(getattr(model.config, "max_target_positions", max_len))
    if max_len > limit:
        raise ValueError(f"prefix ({P}) + max_new_tokens ({max_new_tokens}) exceeds the decoder's {limit} positions")
    k = max(int(draft_len), 0)
    if draft_budget is not None and k:
        k = min(k, max(1, int(draft_budget) // B))
    V = tables.vocab_size
    eos, pad = tables.eos_id, tables.pad_id
    if encoder_outputs is None:
        encoder_outputs = model.get_encoder()(input_features)
    fast = _candidate_projection_ok(model) if project is None else bool(project)
    decoder = model.get_decoder() if fast else None
    enc_h = encoder_outputs[0] if fast else None
    weight = model.get_output_embeddings().weight if fast else None
    sup, begin = _suppress_lists(model) if suppress else ([], [])
    sup_t = torch.tensor([t for t in sup if 0 <= t < V], dtype=torch.long, device=device)
    begin_t = torch.tensor([t for t in begin if 0 <= t < V], dtype=torch.long, device=device)

    row_max = torch.full((B,), max_len, dtype=torch.long, device=device)
    if exact_lengths is not None:
        if len(exact_lengths) != B or min(exact_lengths) < 1 or max(exact_lengths) > max_new_tokens:
            raise ValueError(f"exact_lengths must be {B} values in 1..{max_new_tokens}")
        row_max = torch.tensor([P + int(x) for x in exact_lengths], dtype=torch.long, device=device)
    ids = torch.full((B, max_len + k + 1), pad, dtype=torch.long, device=device)
    ids[:, :P] = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)
    n = torch.full((B,), P, dtype=torch.long, device=device)  # committed tokens per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    state = init_state(B, tables, device)  # state after ids[:, P:n]
    keep = torch.ones(B, 0, dtype=torch.bool, device=device)  # valid KV-cache slots
    cache = None
    stats = {"decoder_passes": 0, "tokens": 0, "drafted": 0, "accepted": 0, "lf_passes": 0, "lf_tokens": 0,
             "full_rows": 0, "compact_rows": 0, "compact_cols": 0, "near_ties": 0, "max_drafts": 0,
             "forced_eos": 0}
    ar = torch.arange(B, device=device)
    first = True
    lf_start: float | None = None
    while True:
        seq = ids[:, P:]
        states = [state]
        drafts: list[Tensor] = []
        dvalid: list[Tensor] = []
        if not first and k:
            room = (row_max - n - 1).clamp(min=0)
            live = ~done & (state.phase != TRANSCRIPT)
            if bool(live.any()):
                s = state
                last = ids.gather(1, (n - 1)[:, None]).squeeze(1)
                hits = prior.hits(seq, state.tlen, state.ptr) if prior is not None else None
                for j in range(1, k + 1):
                    tok, ok, copy = _draft_step(s, seq, tables, prior, last, hits)
                    ok = ok & live & (j <= room)
                    if dvalid:
                        ok = ok & dvalid[-1]
                    any_ok, all_copy = torch.stack([ok.any(), (copy | ~ok).all()]).tolist()
                    if not any_ok:
                        break
                    # rows without a usable draft keep their state: nothing after it is used
                    s = replace(s, ptr=torch.where(ok, s.ptr + 1, s.ptr)) if all_copy else advance(s, tok, seq, tables)
                    last = tok
                    drafts.append(torch.where(ok, tok, pad))
                    dvalid.append(ok)
                    states.append(s)
        K = 1 + len(drafts)
        stats["max_drafts"] = max(stats["max_drafts"], K - 1)
        if lf_start is None and not first and bool((state.phase != TRANSCRIPT).any()):
            lf_start = time.perf_counter()
        if first:
            q = ids[:, :P]
            pos = torch.arange(P, device=device).expand(B, P)
            qvalid = torch.ones(B, P, dtype=torch.bool, device=device)
        else:
            pending = ids.gather(1, (n - 1)[:, None])
            q = torch.cat([pending] + [d[:, None] for d in drafts], 1)
            pos = (n - 1)[:, None] + torch.arange(K, device=device)[None]
            qvalid = torch.cat([~done[:, None]] + [v[:, None] for v in dvalid], 1)
            q = torch.where(qvalid, q, pad)
            pos = pos.clamp(max=limit - 1)
        new_keep = torch.cat([keep, qvalid], 1)
        mask = None if bool(new_keep.all()) else new_keep.long()
        if fast:
            dout = decoder(input_ids=q, attention_mask=mask, encoder_hidden_states=enc_h, past_key_values=cache,
                           position_ids=pos, use_cache=True)
            cache = dout.past_key_values
            hidden = dout.last_hidden_state[:, -1:] if first else dout.last_hidden_state  # [B, K, d]
            logits = None
        else:
            out = model(encoder_outputs=encoder_outputs, decoder_input_ids=q, decoder_position_ids=pos,
                        decoder_attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1:] if first else out.logits  # [B, K, V]
            hidden = None
        stats["decoder_passes"] += 1
        if bool((state.phase != TRANSCRIPT).any()):
            stats["lf_passes"] += 1
        at_begin = (n[:, None] + torch.arange(K, device=device)[None]) == P  # [B, K]
        st = _stack_states(states) if K > 1 else states[0]
        cm = None
        if constrained:
            remaining = (max_len - (n[:, None] + torch.arange(K, device=device)[None])).reshape(-1)
            cm = candidate_mask(st, seq.repeat_interleave(K, 0) if K > 1 else seq, tables, decoding=True,
                                remaining=remaining)
        g = _select(hidden, logits, weight, cm, st.phase, at_begin.reshape(-1), sup_t, begin_t, V, stats).view(B, K)
        if K > 1:
            d = torch.stack(drafts, 1)
            match = (d == g[:, :-1]) & torch.stack(dvalid, 1)
            m = match.long().cumprod(1).sum(1)
            stats["drafted"] += int(torch.stack(dvalid, 1).sum())
        else:
            m = torch.zeros(B, dtype=torch.long, device=device)
        # new tokens are g[:, :m+1]; stop after the first <|endoftext|>
        j = torch.arange(K, device=device)[None]
        take = (j <= m[:, None]) & ~done[:, None]
        # what ends a row: <|endoftext|> ("|" too with stop_at_separator), nothing with exact_lengths
        ends = (g == eos) | ((g == tables.sep_id) if stop_at_separator else False)
        if exact_lengths is not None:
            ends = torch.zeros_like(ends)
        ends &= take
        eos_at = torch.where(ends.any(1), ends.to(torch.uint8).argmax(1), K)
        take &= j <= eos_at[:, None]
        take &= (n[:, None] + j) < row_max[:, None]
        cnt = take.sum(1)
        stats["accepted"] += int((cnt - 1).clamp(min=0).sum())
        stats["tokens"] += int(cnt.sum())
        stats["lf_tokens"] += int(torch.where(state.phase != TRANSCRIPT, cnt, 0).sum())
        cols = torch.where(take, n[:, None] + j, ids.shape[1] - 1)
        ids.scatter_(1, cols, torch.where(take, g, pad))
        ids[:, -1] = pad
        # state after the new tokens: state after the accepted drafts, then the model's own token
        last = (cnt - 1).clamp(min=0)
        if K > 1:
            sm = _stack_states(states).index(ar * K + last)
        else:
            sm = state
        gl = g.gather(1, last[:, None]).squeeze(1)
        moved = advance(sm, gl, ids[:, P:], tables)
        state = moved.where(cnt > 0, state)
        n = n + cnt
        done = done | ends.any(1) | (n >= row_max)
        if constrained and pad == eos:
            # a closed tree allows only <|endoftext|> (= pad): append it without another decoder pass
            fin = ~done & (state.phase == DONE) & (n < row_max)
            if bool(fin.any()):
                ids.scatter_(1, torch.where(fin, n, ids.shape[1] - 1)[:, None], eos)
                ids[:, -1] = pad
                n = n + fin.long()
                done = done | fin
                stats["tokens"] += int(fin.sum())
                stats["lf_tokens"] += int(fin.sum())
                stats["forced_eos"] += int(fin.sum())
        # KV cache: slots of the pending token and accepted drafts stay; the rest become holes,
        # and trailing slots that no row needs are cropped.
        if first:
            keep = new_keep
        else:
            used = (j < cnt[:, None]) & qvalid
            keep = torch.cat([keep, used], 1)
            tail = int((~keep).flip(1).to(torch.uint8).cumprod(1).sum(1).min())
            if tail:
                cache.crop(-tail)
                keep = keep[:, : keep.shape[1] - tail]
        first = False
        if bool(done.all()):
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats["lf_seconds"] = 0.0 if lf_start is None else time.perf_counter() - lf_start
    seqs = [ids[b, : int(n[b])].tolist() for b in range(B)]
    return seqs, stats
