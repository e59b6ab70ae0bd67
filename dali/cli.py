"""``dali <command> [flags]``: the one entry point of every command (``python -m dali.cli <command>``, which
torchrun's ``-m`` also takes). A command's module is imported only to run it: its help comes from its config
alone, before torch loads."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

from dali.cpu_kernels import PINNED_COMMANDS, pin_environment
from dali.errors import DaliError
from dali.flags import parse_config
from dali.stage_table import COMMANDS, GROUPS


def usage() -> str:
    lines = ["usage: dali <command> [--help | flags]", "", "Zero-shot audio captioning from an image captioner."]
    for title, rows in GROUPS.items():
        lines += ["", f"{title}:"] + [f"  {row.command:<18}{row.help}" for row in rows]
    return "\n".join(lines + ["", "`dali <command> --help` lists a command's flags."])


def run(command: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; a user's mistake (:class:`DaliError`) is one line on stderr and status 2."""
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except DaliError as error:
        print(f"dali {command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dali: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    row = COMMANDS[command]
    if "-h" in rest or "--help" in rest:
        return run(command, functools.partial(_help, row.config), rest)
    if command in PINNED_COMMANDS:  # before the command's module loads torch
        pin_environment()
    return run(command, importlib.import_module(row.module).main, rest)


def _help(config_class: str, argv: list[str]) -> int:
    """A command's help, from its config's flags (argparse prints it and exits), with no model library loaded."""
    from dali import command_configs

    parse_config(getattr(command_configs, config_class), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
