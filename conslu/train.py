"""Compatibility names: training moved to :mod:`conslu.training` and ``conslu train`` to
:mod:`conslu.commands.train`. ``conslu.train.SLUModule`` etc. stay importable so old configs and
checkpoints that name them still load."""

from __future__ import annotations

from conslu.training import (BucketBatchSampler, ExportBest, ResumableDataLoader, SLUCLI, SLUCollator,
                             SLUDataModule, SLUExamples, SLUModule, SpecAugment, decode_encoder_outputs,
                             export_model)

__all__ = [
    "BucketBatchSampler",
    "ResumableDataLoader",
    "SLUExamples",
    "SLUCollator",
    "SpecAugment",
    "SLUDataModule",
    "SLUModule",
    "ExportBest",
    "export_model",
    "decode_encoder_outputs",
    "SLUCLI",
    "cmd_train",
]


def cmd_train(argv: list[str]) -> int:
    """The old entry point of ``conslu train``, forwarding to :func:`conslu.commands.train.run_argv`
    (``conslu/cli.py`` now dispatches to :mod:`conslu.commands`; delete this once nothing calls it)."""
    from conslu.commands.train import run_argv

    return run_argv(argv)
