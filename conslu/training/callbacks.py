"""Training callbacks: export of the best model so far, and per-step wall times."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from conslu.training.export import export_model

__all__ = ["ExportBest", "StepTimer"]


class ExportBest(Callback):
    """After each validation, export the model as a ConSLU folder when ``monitor`` improves.

    Args:
        dirpath: output folder (default ``<trainer.default_root_dir>/best``).
        monitor: logged metric to compare (``val/em``).
        mode: ``max`` or ``min``.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/em", mode: Literal["max", "min"] = "max") -> None:
        self.dirpath = dirpath
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not self._better(value):
            return
        self.best = value
        if trainer.is_global_zero:
            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "best")
            info = {"monitor": self.monitor, "value": value, "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
            export_model(pl_module.slu, dirpath, info)
        trainer.strategy.barrier("conslu_export_best")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class StepTimer(Callback):
    """Wall time of every training batch (forward + backward + optimizer), for s/step figures."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

    def seconds_per_step(self) -> float | None:
        """Median over the timed batches, leaving out the first (warm-up of allocators and threads)."""
        ts = self.times[1:] if len(self.times) > 1 else self.times
        return statistics.median(ts) if ts else None
