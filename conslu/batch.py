"""Teacher-forcing batches: (transcript, logical form[, meta]) examples -> padded
``decoder_input_ids`` and ``labels`` and, for the constrained loss, the teacher-forced constraint
states. One collator serves :meth:`conslu.model.ConSLU.collate`, the training data loaders and the
benchmarks; it holds the tokenizer and CPU tables only, so data-loader workers can pickle it."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from conslu.constraints import Tables
from conslu.loss import IGNORE, cpu_tables, teacher_states

__all__ = ["TargetCollator", "META"]

META = ("gender", "native", "domain")  # the example metadata a target format may use


class TargetCollator:
    """``decoder_input_ids = prompt + target[:-1]``; ``labels = [-100] * (P - 1) + target`` (padding
    -100); with ``with_states``, ``loss_states`` (CPU) to pass to the loss, which keeps the state
    machine off the training step."""

    def __init__(self, tokenizer: Any, tables: Tables | None = None, *, with_states: bool = False) -> None:
        if with_states and tables is None:
            raise ValueError("constraint states need the simplified target format (constraint tables)")
        self.tokenizer = tokenizer
        self.tables = None if tables is None else cpu_tables(tables)
        self.with_states = with_states

    @classmethod
    def for_model(cls, slu: Any) -> "TargetCollator":
        """The collator of a :class:`conslu.model.ConSLU` (states when its loss is constrained)."""
        return cls(slu.tokenizer, slu.tables, with_states=bool(slu.loss_constrained))

    def __call__(self, examples: Sequence[tuple], *, with_states: bool | None = None) -> dict[str, Any]:
        prefix = self.tokenizer.prefix_ids
        P = len(prefix)
        targets = []
        for ex in examples:
            meta = dict(ex[2]) if len(ex) > 2 and ex[2] else {}
            targets.append(self.tokenizer.encode(ex[0], ex[1], **{k: meta[k] for k in META if k in meta}))
        T = P - 1 + max(len(t) for t in targets)
        dec = torch.full((len(targets), T), self.tokenizer.pad_token_id, dtype=torch.long)
        lab = torch.full((len(targets), T), IGNORE, dtype=torch.long)
        for i, t in enumerate(targets):
            seq = prefix + t
            dec[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            lab[i, P - 1 : P - 1 + len(t)] = torch.tensor(t)
        out: dict[str, Any] = {"decoder_input_ids": dec, "labels": lab}
        if self.with_states if with_states is None else with_states:
            if self.tables is None:
                raise ValueError("constraint states need the simplified target format (constraint tables)")
            out["loss_states"] = teacher_states(lab, self.tables)
        return out
