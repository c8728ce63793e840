"""The sub-commands of ``conslu``: one module per command, listed in :data:`MODULES`.

A command module is all the command line knows of a command. It defines::

    NAME = "parse"                                   # the sub-command
    HELP = "transcribe and parse audio files"        # its line in `conslu --help`
    def add_arguments(p: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...    # the exit code

A command whose arguments another parser reads (``train``: LightningCLI) sets
``PASS_THROUGH = True`` and defines ``run_argv(argv: list[str]) -> int`` instead of
``add_arguments``/``run``; it gets every argument after its name, ``--help`` included.

Groups: a ``NAME`` of two words is a command inside a group. ``grammar_extract.py`` has
``NAME = "grammar extract"`` and ``grammar_show.py`` ``NAME = "grammar show"``; the command line
makes the ``grammar`` group (help "grammar commands") from them, in the order of :data:`MODULES`.

Command modules import only the standard library and light ``conslu`` modules at the top; the
work (torch, transformers, the domain modules) is imported inside ``run``, so ``conslu --help``
stays fast. Flags shared by several commands are defined once in :mod:`conslu.commands._options`.
The work itself lives in the domain modules (``conslu.parse``, ``conslu.runner``,
``conslu.grammar``, ...), which know nothing of argparse.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MODULES", "load"]

# In the order of `conslu --help`.
MODULES: tuple[str, ...] = (
    "grammar_extract",
    "grammar_show",
    "score",
    "normalize",
    "convert_ct2",
    "transcribe",
    "synth",
    "init",
    "parse",
    "train",
    "evaluate",
    "demo",
    "serve",
    "bench",
)


def load() -> list[ModuleType]:
    """The command modules, in :data:`MODULES` order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]
