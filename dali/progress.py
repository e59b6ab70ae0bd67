"""Progress bars for long work."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, **kwargs):
    """A tqdm bar; DALI_PROGRESS=0 turns bars off, and logs that are not a terminal get few updates."""
    from tqdm.auto import tqdm

    if os.environ.get("DALI_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 20.0)
    return tqdm(iterable, **kwargs)
