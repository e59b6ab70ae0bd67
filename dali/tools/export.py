"""``dali export --run RUN OUT``: a finished run as a model folder to share (:mod:`dali.model_folder`; flags:
``command_configs.ExportConfig``)."""

from __future__ import annotations

from pathlib import Path

from dali import model_folder
from dali.command_configs import ExportConfig
from dali.flags import parse_config
from dali.logs import log, setup_logging
from dali.run import Run


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(ExportConfig, argv)
    run = Run.find(config.run, config.expe_dir)
    out = Path(config.out)
    written = model_folder.export(
        run,
        out,
        projector=config.projector,
        use_prefix=config.use_prefix,
        llava=config.llava,
        overwrite=config.overwrite,
        allow_modified=config.allow_modified,
    )
    parts = f"{written['projector']} projector" + (" + prefix" if written["prefix"] else "")
    log.info("exported %s (%s) to %s", run.folder, parts, out)
    print(f"{out}: {written['audio_encoder']['family']} encoder, {parts}, LLaVA {written['llava']}")
    if config.push_to_hub:
        url = push_to_hub(out, config.push_to_hub)
        print(f"uploaded to {url}")
    return 0


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the folder to a Hub model repository (created if absent) through huggingface_hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    return str(getattr(commit, "commit_url", None) or repo_id)
