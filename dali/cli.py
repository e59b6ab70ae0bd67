"""``dali <command> [flags]``: one console command over the stage entry points."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

from dali import config
from dali.config import parse_config
from dali.errors import DaliError
from dali.stage_table import STAGES

# command -> (module, its config in dali.command_configs, one line for `dali --help`), by group; the module is
# imported only to run the command: its help comes from the config alone, before torch loads
GROUPS = {
    "the method's stages, in order": {row.command: (row.module, row.config, row.help) for row in STAGES},
    "tools": {
        "caption": ("dali.stages.caption", "CaptionConfig", "caption any audio or video file with a finished run"),
        "app": ("dali.stages.app", "AppConfig", "a web page to caption a clip (upload or record) with a run"),
        "evaluate": ("dali.stages.evaluate", "EvaluateConfig", "score a predictions file against a test list"),
        "prepare": ("dali.stages.prepare", "PrepareConfig", "media files -> 16 kHz wavs, frames and a CAV-MAE list"),
        "import-original": (
            "dali.stages.import_original",
            "ImportOriginalConfig",
            "the released DALI weights -> a run folder",
        ),
    },
    "the built-in synthetic world": {
        "world": (
            "dali.synthetic.build",
            "WorldCommandConfig",
            "generate the world and train its tiny image captioner",
        ),
        "demo": ("dali.synthetic.demo", "DemoConfig", "the whole method on the world, and its results table"),
    },
}
COMMANDS = {name: (module, config) for group in GROUPS.values() for name, (module, config, _) in group.items()}


def usage() -> str:
    lines = ["usage: dali <command> [--help | flags]", "", "Zero-shot audio captioning from an image captioner."]
    for title, commands in GROUPS.items():
        lines += ["", f"{title}:"] + [f"  {name:<18}{text}" for name, (*_, text) in commands.items()]
    return "\n".join(lines + ["", "`dali <command> --help` lists a command's flags."])


def run(command: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main``; a user's mistake (:class:`DaliError`) is one line on stderr and status 2."""
    config.PROG = f"dali {command}"  # the usage line of the command's help and errors
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
    module, config_class = COMMANDS[command]
    if "-h" in rest or "--help" in rest:
        return run(command, functools.partial(_help, config_class), rest)
    return run(command, importlib.import_module(module).main, rest)


def _help(config_class: str, argv: list[str]) -> int:
    """A command's help, from its config's flags (argparse prints it and exits), with no model library loaded."""
    from dali import command_configs

    parse_config(getattr(command_configs, config_class), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
