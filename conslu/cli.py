"""The `conslu` command line: one sub-command per user task.

The sub-commands are the modules of :mod:`conslu.commands` (see there for their interface):
each declares its name, help and arguments and runs the command. Handlers return a process exit
code; Ctrl-C is exit 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from conslu import commands


def build_parser(modules: list[ModuleType] | None = None) -> argparse.ArgumentParser:
    """The parser of every command in ``modules`` (default: :func:`conslu.commands.load`)."""
    parser = argparse.ArgumentParser(prog="conslu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for mod in commands.load() if modules is None else modules:
        where, leaf = sub, mod.NAME
        if " " in mod.NAME:
            group, leaf = mod.NAME.split(" ")
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", required=True)
            where = groups[group]
        if getattr(mod, "PASS_THROUGH", False):  # listed only: main() hands it its arguments
            where.add_parser(leaf, help=mod.HELP, add_help=False)
            continue
        p = where.add_parser(leaf, help=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = commands.load()
    try:
        for mod in modules:
            words = mod.NAME.split(" ")
            if getattr(mod, "PASS_THROUGH", False) and argv[: len(words)] == words:
                return int(mod.run_argv(argv[len(words):]) or 0)  # another parser reads them (train: LightningCLI)
        args = build_parser(modules).parse_args(argv)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("conslu: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`conslu ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
