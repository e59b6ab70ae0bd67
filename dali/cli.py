"""``dali <command> [flags]``: one console command over the stage entry points."""

from __future__ import annotations

import importlib
import sys

from dali.stages import STAGES

COMMANDS = dict(
    STAGES,
    prepare="dali.stages.prepare",
    caption="dali.stages.caption",
    **{"import-original": "dali.stages.import_original"},
    world="dali.synthetic.build",
    demo="dali.synthetic.demo",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dali <command> [--help | flags]\n\ncommands:\n" + "\n".join(f"  {name}" for name in COMMANDS))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dali: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
