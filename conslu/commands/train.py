"""``conslu train``: LightningCLI parses its own arguments (``--config conf/<name>.yaml``, overrides)."""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "train"
HELP = "train with Lightning (LightningCLI; see conf/)"
PASS_THROUGH = True  # the arguments after `train` go to run_argv unparsed


def run_argv(argv: list[str]) -> int:
    """Parse with LightningCLI, then ``trainer.fit`` (resuming from ``--ckpt_path``); the exit code."""
    from conslu.training.cli import make_cli, run_fit

    try:
        cli = make_cli(argv, seed=0)
    except SystemExit as e:  # --help, --print_config, argument errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    ckpt = cli.config.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(ckpt).is_file():
        print(f"conslu train: --ckpt_path {ckpt}: no such checkpoint file", file=sys.stderr)
        return 2
    if ckpt == "last":
        last = Path(cli.config["checkpoint"]["dirpath"]) / "last.ckpt"
        if not last.is_file():
            print(f"conslu train: --ckpt_path last: {last} does not exist (nothing to resume)", file=sys.stderr)
            return 2
        ckpt = str(last)
    try:
        run_fit(cli, ckpt)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after a graceful shutdown
        if getattr(cli.trainer, "interrupted", False):
            print("conslu train: interrupted; resume with --ckpt_path last (same config)", file=sys.stderr)
            return 130
        raise
    return 0
