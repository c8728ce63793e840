"""LightningCLI set-up, shared by ``conslu train`` and the demo / ablation recipe.

:func:`make_cli` parses a command line (or a config dict) into an :class:`SLUCLI` holding the
model, the data module and the Trainer, and :func:`run_fit` trains them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from conslu.training.callbacks import ExportBest
from conslu.training.datamodule import SLUDataModule
from conslu.training.module import SLUModule

__all__ = ["SLUCLI", "make_cli", "run_fit"]

PROG = "conslu train"
# Lightning >= 2.6 loads checkpoints with weights_only when asked (older ones take no such argument)
_FIT_WEIGHTS_ONLY = "weights_only" in inspect.signature(pl.Trainer.fit).parameters


class SLUCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path``, a ModelCheckpoint (``checkpoint.*``) and ExportBest (``export.*``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint, or 'last' for <checkpoint.dirpath>/last.ckpt")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/em",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-step{step}-em{val/em:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(ExportBest, "export")
        parser.set_defaults({"trainer.use_distributed_sampler": False, "trainer.num_sanity_val_steps": 0})

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        root = cfg["trainer"].get("default_root_dir") or os.getcwd()
        if cfg["checkpoint"].get("dirpath") is None:
            cfg["checkpoint"]["dirpath"] = os.path.join(root, "checkpoints")
        if cfg["export"].get("dirpath") is None:
            cfg["export"]["dirpath"] = os.path.join(root, "best")


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    # LightningCLI warns when sys.argv holds words besides `args` (always, under `conslu` or pytest)
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


def make_cli(args: Sequence[str] | dict, *, seed: int = 0, callbacks: Sequence[Callback] = ()) -> SLUCLI:
    """Parse ``args`` (``conslu train`` arguments such as ``["--config", "conf/cpu-tiny.yaml", ...]``,
    or a config dict) and instantiate SLUModule, SLUDataModule and the Trainer (with ``callbacks``
    besides those the config names); nothing is run. ``seed``: ``seed_everything`` unless the config
    sets it. Raises SystemExit for ``--help``, ``--print_config`` and bad settings, as argparse does."""
    with _argv([PROG]):
        return SLUCLI(
            SLUModule,
            SLUDataModule,
            run=False,
            args=list(args) if not isinstance(args, dict) else args,
            seed_everything_default=seed,
            trainer_defaults={"callbacks": list(callbacks)} if callbacks else {},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG, "default_env": False},
        )


def run_fit(cli: SLUCLI, ckpt_path: str | None = None) -> None:
    """``trainer.fit`` of the CLI's model and data module, resuming from ``ckpt_path`` if given.
    Checkpoints are loaded with ``weights_only=True``: no code is unpickled from a checkpoint file."""
    kwargs: dict[str, Any] = {"weights_only": True} if _FIT_WEIGHTS_ONLY else {}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, **kwargs)
