"""``dali <command> [flags]``: one console command over the stage entry points."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from dali.errors import DaliError
from dali.stages import STAGES

COMMANDS = dict(
    STAGES,
    prepare="dali.stages.prepare",
    caption="dali.stages.caption",
    **{"import-original": "dali.stages.import_original"},
    world="dali.synthetic.build",
    demo="dali.synthetic.demo",
)


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
        print("usage: dali <command> [--help | flags]\n\ncommands:\n" + "\n".join(f"  {name}" for name in COMMANDS))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dali: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run(command, importlib.import_module(COMMANDS[command]).main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
