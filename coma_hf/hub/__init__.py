"""The package's side of a checkpoint: its model card and its upload. Explicit functions; no class is patched.

- `card`: `save_checkpoint` (`save_pretrained` + the CoMa card, the save every script and trainer uses),
  `render_model_card`, `write_model_card`, `write_run_summary`, `hardware`;
- `push`: `push_to_hub` (a model or folder to the Hub in one commit, with the card), `prepare_upload`,
  `upload_folder_to_hub`, `scrub_local_paths`.
"""

from .card import (
    CONTRASTIVE_SUMMARY,
    CONVERSION_SUMMARY,
    PRETRAIN_SUMMARY,
    SUMMARY_FILES,
    hardware,
    read_json_file,
    render_model_card,
    save_checkpoint,
    template_path,
    write_model_card,
    write_run_summary,
)
from .push import prepare_upload, push_to_hub, scrub_local_paths, upload_folder_to_hub

__all__ = [
    "CONTRASTIVE_SUMMARY",
    "CONVERSION_SUMMARY",
    "PRETRAIN_SUMMARY",
    "SUMMARY_FILES",
    "hardware",
    "prepare_upload",
    "push_to_hub",
    "read_json_file",
    "render_model_card",
    "save_checkpoint",
    "scrub_local_paths",
    "template_path",
    "upload_folder_to_hub",
    "write_model_card",
    "write_run_summary",
]
