"""Validation scores as a torchmetrics Metric, so they reduce correctly over DDP ranks.

Each rank adds, per decoded example, its dataset index and the figures of
:func:`conslu.metrics.score` (EM, EM-tree and validity flags from :func:`conslu.metrics.score_one`,
word errors and reference words from :func:`conslu.metrics.word_errors`), and per batch its
loss x rows. ``compute`` gathers them from every rank (torchmetrics' ``cat`` reduction, uneven
sizes allowed), counts each example once - the DDP sampler pads shards by repeating batches - and
returns exactly what ``conslu.metrics.score`` gives for the whole split: EM, EM-tree, validity
(fractions) and corpus WER (total word errors over total reference words), plus the row-weighted
validation loss over every scored batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from conslu.metrics import score_one, word_errors

__all__ = ["ValidationScores"]

_COUNTS = ("index", "em", "em_tree", "valid", "word_errors", "ref_words")


class ValidationScores(Metric):
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in _COUNTS:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("loss_sums", default=[], dist_reduce_fx="cat")  # loss x rows of each batch
        self.add_state("loss_rows", default=[], dist_reduce_fx="cat")

    def update(self, refs: Sequence[dict], hyps: Sequence[dict], grammar: Any = None, *,
               loss: float | None = None, loss_rows: int = 0) -> None:
        """``refs``: dicts with index, transcript, logical_form; ``hyps``: transcript, logical_form."""
        values: dict[str, list[int]] = {name: [] for name in _COUNTS}
        for ref, hyp in zip(refs, hyps, strict=True):
            flags = score_one(ref.get("logical_form") or "", hyp.get("logical_form"), grammar)
            errors, words = word_errors([ref.get("transcript") or ""], [hyp.get("transcript") or ""])
            for name, value in (("index", ref["index"]), ("em", flags["em"]), ("em_tree", flags["em_tree"]),
                                ("valid", flags["valid"]), ("word_errors", errors), ("ref_words", words)):
                values[name].append(int(value))
        for name, vs in values.items():
            getattr(self, name).append(torch.tensor(vs, dtype=torch.long, device=self.device))
        # one entry per batch (0 rows without a loss), so no rank syncs an empty state
        if loss is None:
            loss, loss_rows = 0.0, 0
        self.loss_sums.append(torch.tensor([float(loss) * loss_rows], dtype=torch.float64, device=self.device))
        self.loss_rows.append(torch.tensor([loss_rows], dtype=torch.long, device=self.device))

    def compute(self) -> dict[str, float]:
        cols = {name: dim_zero_cat(getattr(self, name)).tolist() for name in _COUNTS}
        seen: set[int] = set()
        keep = [i for i, idx in enumerate(cols["index"]) if not (idx in seen or seen.add(idx))]
        n = len(keep)
        errors = sum(cols["word_errors"][i] for i in keep)
        words = sum(cols["ref_words"][i] for i in keep)
        out = {
            "n": n,
            "em": sum(cols["em"][i] for i in keep) / n,
            "em_tree": sum(cols["em_tree"][i] for i in keep) / n,
            "validity": sum(cols["valid"][i] for i in keep) / n,
            # conslu.metrics' corpus WER; with no reference words: 0 without hypothesis words, else 1
            "wer": errors / words if words else (0.0 if errors == 0 else 1.0),
            "word_errors": errors,
            "ref_words": words,
        }
        rows = sum(dim_zero_cat(self.loss_rows).tolist())
        if rows:
            out["loss"] = sum(dim_zero_cat(self.loss_sums).tolist()) / rows
        return out
