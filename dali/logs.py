"""The ``dali`` logger, and the one setup of logging that every command makes."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("dali")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("DALI_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
