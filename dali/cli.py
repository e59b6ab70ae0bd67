"""``dali <command> [flags]``: one console command over the stage entry points."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from dali import config
from dali.errors import DaliError

# command -> (module, one line for `dali --help`), by group; the modules are imported only for the command run
GROUPS = {
    "the method's stages, in order": {
        "prefix-tune": ("dali.stages.prefix_tune", "1a: learn the prefix that makes LLaVA describe a frame's sounds"),
        "align": ("dali.stages.align", "1b: align an audio encoder's tokens with CLIP's (MMD, OT, OT-Att)"),
        "pseudo-label": ("dali.stages.pseudo_label", "2a: caption clips from image + audio tokens + prefix"),
        "distill": ("dali.stages.distill", "2b: train a projector copy on those captions, audio only"),
        "infer": ("dali.stages.infer", "caption a test list (audio, audio + image, image) and score it"),
    },
    "tools": {
        "caption": ("dali.stages.caption", "caption any audio or video file with a finished run"),
        "evaluate": ("dali.stages.evaluate", "score a predictions file against a test list"),
        "prepare": ("dali.stages.prepare", "media files -> 16 kHz wavs, frames and a CAV-MAE list"),
        "import-original": ("dali.stages.import_original", "the released DALI weights -> a run folder"),
    },
    "the built-in synthetic world": {
        "world": ("dali.synthetic.build", "generate the world and train its tiny image captioner"),
        "demo": ("dali.synthetic.demo", "the whole method on the world, and its results table"),
    },
}
COMMANDS = {name: module for group in GROUPS.values() for name, (module, _) in group.items()}


def usage() -> str:
    lines = ["usage: dali <command> [--help | flags]", "", "Zero-shot audio captioning from an image captioner."]
    for title, commands in GROUPS.items():
        lines += ["", f"{title}:"] + [f"  {name:<18}{text}" for name, (_, text) in commands.items()]
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
    return run(command, importlib.import_module(COMMANDS[command]).main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
