"""ConSLU training loss (method eq. 1-3): Loss = Loss_ASR + Loss_SLU over one padded batch.

* Transcript part (every target token up to and including "|"): cross-entropy over the full vocabulary.
* Logical-form part (every token after "|", the closing <|endoftext|> included): cross-entropy
  whose softmax runs only over the candidate set C_t (``constraints.candidate_mask`` on the
  teacher-forced state). The final <|endoftext|> has C_t = {eos} (the decoder forces it too), so
  it contributes exactly 0; it is still counted in the denominator.
* Reduction: sum over all real tokens (labels != -100) divided by their number - the same
  denominator as plain cross-entropy, so the ablation (``constrained=False``: plain CE
  everywhere) is comparable token for token.
* A reference token outside its C_t (only possible when the data has a grammar pair the grammar
  lacks) is added to its own C_t so the loss stays finite; once the teacher-forced state machine
  rejects a sequence (ERROR), the rest of that sequence falls back to the full vocabulary. Data
  loading refuses such rows beforehand (``uncopyable_rows``), so this guards only hand-made batches.

Teacher-forced states depend on the labels only, so ``teacher_states`` can run in the data loader
(``ConSLU.collate``) and be passed in; otherwise ``slu_loss`` computes them on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from conslu.constraints import ERROR, OPEN, State, Tables, advance, candidate_mask, init_state

IGNORE = -100


@dataclass
class LossStates:
    """Teacher-forced states of the N logical-form steps of a [B, T] label batch."""

    rows: Tensor  # [N] flat index b * T + t of each logical-form label
    targets: Tensor  # [N] its label
    batch: Tensor  # [N] its batch row
    state: State  # state before the step (N rows)
    seq: Tensor  # [B, L] target tokens of each batch row (transcript first), pad elsewhere

    def to(self, device: Any) -> "LossStates":
        return replace(self, state=self.state.to(device),
                       **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                          if isinstance(getattr(self, f.name), Tensor)})


def teacher_states(labels: Tensor, tables: Tables) -> LossStates:
    """Run the state machine over the logical-form part of every row (vectorised over the batch)."""
    labels = labels.to(tables.device)
    B, T = labels.shape
    real = labels != IGNORE
    start = real.to(torch.uint8).argmax(1)  # first target position of each row
    rel = torch.arange(T, device=labels.device)
    pos = (start[:, None] + rel[None]).clamp(max=T - 1)
    valid = real.gather(1, pos) & ((start[:, None] + rel[None]) < T)
    seq = torch.where(valid, labels.gather(1, pos), tables.pad_id)
    is_sep = (seq == tables.sep_id) & valid
    has_sep = is_sep.any(1)
    sep = is_sep.to(torch.uint8).argmax(1)
    n_valid = valid.sum(1)
    lf_len = torch.where(has_sep, n_valid - sep - 1, 0)
    J = int(lf_len.max().item()) if B else 0
    state = init_state(B, tables, labels.device, phase=OPEN).fit(T)
    state.tlen = sep.clone()
    lf_pos = sep + 1  # target-relative position of LF step j is sep + 1 + j
    snaps: list[State] = []
    toks: list[Tensor] = []
    for j in range(J):
        p = (lf_pos + j).clamp(max=T - 1)
        tok = seq.gather(1, p[:, None]).squeeze(1)
        snaps.append(state)
        toks.append(tok)
        state = advance(state, tok, seq, tables)
    if J == 0:
        e = torch.zeros(0, dtype=torch.long, device=labels.device)
        st = init_state(0, tables, labels.device)
        return LossStates(rows=e, targets=e, batch=e, state=st, seq=seq)
    j = torch.arange(J, device=labels.device)
    keep = j[None] < lf_len[:, None]  # [B, J]
    bi, ji = keep.nonzero(as_tuple=True)
    stacked = {f: torch.stack([getattr(s, f) for s in snaps], 1)[bi, ji]
               for f in ("phase", "depth", "top", "ptr", "tlen", "wpos")}
    st = State(**stacked, stack=None)
    tgt = torch.stack(toks, 1)[bi, ji]
    rows = bi * T + start[bi] + lf_pos[bi] + ji
    return LossStates(rows=rows, targets=tgt, batch=bi, state=st, seq=seq)


def uncopyable_rows(labels: Tensor, tables: Tables) -> list[int]:
    """Rows of a label batch that the state machine rejects (a tree word that is not a whole-word,
    in-order copy of the transcript, a label outside the grammar, a malformed tree)."""
    ls = teacher_states(labels, tables)
    bad = ls.state.phase == ERROR
    nxt = advance(ls.state, ls.targets, ls.seq.index_select(0, ls.batch), tables)
    bad |= nxt.phase == ERROR
    ok = candidate_mask(ls.state, ls.seq.index_select(0, ls.batch), tables)
    bad |= ~ok[torch.arange(ok.shape[0], device=ok.device), ls.targets]
    return sorted(set(ls.batch[bad].tolist()))


def lf_candidate_mask(ls: LossStates, tables: Tables) -> Tensor:
    """[N, V] candidate masks of the teacher-forced logical-form steps (what the decoder would allow)."""
    return candidate_mask(ls.state, ls.seq.index_select(0, ls.batch), tables)


def slu_loss(logits: Tensor, labels: Tensor, tables: Tables | None, constrained: bool = True,
             states: LossStates | None = None) -> Tensor:
    """Mean token loss of a padded batch; logits [B, T, V], labels [B, T] (-100 = ignore)."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V).float()
    lab = labels.reshape(-1).to(flat.device)
    n_real = (lab != IGNORE).sum().clamp(min=1)
    if not constrained or tables is None:
        return F.cross_entropy(flat, lab, ignore_index=IGNORE, reduction="sum") / n_real
    if states is None:
        states = teacher_states(labels.detach().cpu(), cpu_tables(tables))
    states = states.to(flat.device) if states.rows.device != flat.device else states
    tables = tables.to(flat.device) if tables.device != flat.device else tables
    if states.rows.numel() == 0:
        return F.cross_entropy(flat, lab, ignore_index=IGNORE, reduction="sum") / n_real
    lab_asr = lab.index_fill(0, states.rows, IGNORE)
    asr = F.cross_entropy(flat, lab_asr, ignore_index=IGNORE, reduction="sum")
    mask = lf_candidate_mask(states, tables)
    mask[states.state.phase == ERROR] = True
    mask[torch.arange(mask.shape[0], device=mask.device), states.targets] = True
    lf_logits = flat.index_select(0, states.rows).masked_fill(~mask, float("-inf"))
    slu = F.cross_entropy(lf_logits, states.targets, reduction="sum")
    return (asr + slu) / n_real


_CPU_TABLES: dict[int, Tables] = {}


def cpu_tables(tables: Tables) -> Tables:
    """The tables on the CPU (teacher-forced states are built there), converted once per table set."""
    if tables.device.type == "cpu":
        return tables
    key = id(tables)
    if key not in _CPU_TABLES:
        _CPU_TABLES.clear()
        _CPU_TABLES[key] = tables.to("cpu")
    return _CPU_TABLES[key]
