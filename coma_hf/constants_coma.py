"""The names and defaults every part of CoMa shares: the batch's keys, the label that means "no loss", the compression
tokens' names and the default instructions and layouts. One owner, imported by the processor, the model, the
collators, the trainers and the losses.

Part of the remote code shipped with every checkpoint: imports only the standard library.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # a label with no loss (PyTorch's cross-entropy default)
COMPRESSION_TOKEN_FORMAT = "<cmp_{index}>"  # the name of compression token `index`
IMAGE_PLACEHOLDER = r"<\|image_\d+\|>|<image>"  # MMEB's `<|image_1|>`, LLaVA's `<image>`: where an image goes
DEFAULT_COMPRESS_INSTRUCTION = "Summarize above image and text in a few words."  # the paper's
DEFAULT_QUERY_INSTRUCTION = "Find the matching image or text."
DEFAULT_DOCUMENT_INSTRUCTION = "Represent the given image or text."
# The order and separators of an input's parts (see `layout_coma.InputLayout`): stage 1's input, and a stage-2 query
# or candidate.
COMPRESSION_LAYOUT = "{image}{text}\n{instruction}{compression}"
EMBEDDING_LAYOUT = "{image}{instruction}\n{text}{compression}"
LOSS_ON_MODES = ("answers", "all_after_compression")  # stage-1 label positions (the paper's, the released code's)


class BatchKey:
    """The names of a batch's entries: one owner for the processor, the model, the collators, the trainers and the
    loss. `collate` writes the model inputs (shapes there); the rest are added on the way to training."""

    INPUT_IDS = "input_ids"
    ATTENTION_MASK = "attention_mask"
    IMAGE_TOKENS = "mm_token_type_ids"  # 1 at image placeholder tokens
    PIXEL_VALUES = "pixel_values"
    IMAGE_GRID = "image_grid_thw"
    LABELS = "labels"  # stage 1
    IMAGES_PER_SAMPLE = "num_images_per_sample"  # sentence-transformers' GradCache cuts image rows by it
    SAMPLE_IDS = "sample_ids"  # the rows' ids, named when the loss is not finite
    DROPPED_TURNS = "dropped_turns"  # stage-1 QA turns that did not fit, summed by the trainer
    # A candidate column's optional `[batch]` bool: False where the row has no input of its own there (a hard
    # negative it lacks, a placeholder keeping the column rectangular); the loss drops those from every denominator.
    PRESENT = "present"


MODEL_INPUT_NAMES = (
    BatchKey.INPUT_IDS,
    BatchKey.ATTENTION_MASK,
    BatchKey.IMAGE_TOKENS,
    BatchKey.PIXEL_VALUES,
    BatchKey.IMAGE_GRID,
)


def compression_token_names(count: int, token_format: str = COMPRESSION_TOKEN_FORMAT) -> list[str]:
    """The names of the `count` compression tokens, in order."""
    return [token_format.format(index=index) for index in range(count)]
