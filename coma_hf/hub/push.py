"""Sharing on the Hub: one commit with everything `save_pretrained` writes plus the CoMa model card.

Absolute local paths in the run summaries are shortened to file names first. Lives in the package, not in the remote
code: a checkpoint's remote code makes no network calls. Call `push_to_hub(model_or_folder, repo_id)`; a model's own
`push_to_hub` method is transformers' (which writes transformers' generic card).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..saving import MMEB_RESULTS, MTEB_RESULTS, SUMMARY_FILES
from .card import mteb_summary, write_model_card

# An absolute path (POSIX or Windows) up to its last component; not the "//" of a URL, not a relative path.
ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/\\])(?:/|[A-Za-z]:\\)(?:[^\s/\\'"]+[/\\])+([^\s/\\'"]*)""")


def scrub_local_paths(folder: str | Path) -> None:
    """Shorten every absolute path in the run summaries of `folder` to its last component before they go public
    (skipped rows name image files, `train_dataset` may be a local file): the machine's folders are nobody's
    business."""
    for name in SUMMARY_FILES:
        path = Path(folder) / name
        if path.is_file():
            path.write_text(json.dumps(_scrubbed(json.loads(path.read_text())), indent=2))


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(r"\1", value)
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    return value


def upload_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    commit_message: str = "Upload CoMa model",
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create the repository (and the `revision` branch) if missing and upload `folder` in one commit; returns the
    commit URL. The token is resolved as in transformers: `token`, else `HF_TOKEN`, else `hf auth login`."""
    from huggingface_hub import create_branch, create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def prepare_upload(
    model_or_folder: Any,
    folder: str | Path,
    repo_id: str,
    *,
    license: str = "other",
    eval_results: str | Path | None = None,
    mteb_results: str | Path | None = None,
    **save_kwargs: Any,
) -> list[str]:
    """Write exactly what an upload of `model_or_folder` (a CoMa model, or a folder or Hub id to load one from) to
    `repo_id` holds into `folder`: what `save_pretrained` writes, `eval_results` (an MMEB results JSON) as
    `mmeb_results.json`, the main scores of `mteb_results` (an mteb results folder) as `mteb_results.json`, the
    summaries scrubbed of local paths, and the card rendered for `repo_id`. Returns the relative file names."""
    model = _as_model(model_or_folder)
    folder = Path(folder)
    model.save_pretrained(folder, **save_kwargs)
    if eval_results:
        shutil.copyfile(eval_results, folder / MMEB_RESULTS)
    if mteb_results:
        (folder / MTEB_RESULTS).write_text(json.dumps(mteb_summary(mteb_results), indent=2))
    scrub_local_paths(folder)  # the summaries may name files by absolute path
    write_model_card(folder, repo_id=repo_id, license=license)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def push_to_hub(
    model_or_folder: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    license: str = "other",
    eval_results: str | Path | None = None,
    mteb_results: str | Path | None = None,
    **save_kwargs: Any,
) -> str:
    """Upload a CoMa model (or the one saved in a folder or Hub repository) — weights, remote code, processor,
    sentence-transformers files and the CoMa model card — in one commit; returns the commit URL. (transformers' own
    `model.push_to_hub` would replace the card.)"""
    with tempfile.TemporaryDirectory() as folder:
        prepare_upload(
            model_or_folder,
            folder,
            repo_id,
            license=license,
            eval_results=eval_results,
            mteb_results=mteb_results,
            **save_kwargs,
        )
        return upload_folder_to_hub(
            folder,
            repo_id,
            commit_message=commit_message or "Upload CoMa model",
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _as_model(model_or_folder: Any) -> Any:
    """`model_or_folder` itself if it is a model, else the CoMa model saved there (a folder or Hub id)."""
    if not isinstance(model_or_folder, (str, os.PathLike)):
        return model_or_folder
    from ..modeling_coma import CoMaModel

    return CoMaModel.from_pretrained(model_or_folder)
