"""The collators of both stages: raw rows in, model-ready batches out.

Stage 1: `CoMaCompressionCollator` (rows in any schema `normalize_stage1_record` reads → a left-padded batch with
labels). Stage 2: `CoMaContrastiveCollator` (MMEB-train rows → one sentence-transformers input per side, in loss
order).
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from transformers import BatchFeature

from ..constants_coma import BatchKey
from ..data.sources import ERROR_COLUMN
from ..data.stage1 import normalize_stage1_record
from ..data.stage2 import embedding_input, sides
from ..inputs import CoMaInputError
from ..processing_coma import CoMaProcessor, processor_method


class CoMaCompressionCollator:
    """Turns raw stage-1 rows (any format `normalize_stage1_record` reads) into a left-padded batch with labels.

    Labels follow the processor's `loss_on`. `max_turns` keeps only each conversation's first turns (the single- vs
    multi-turn ablation).
    A bad row raises `CoMaInputError` naming the row's id and the field. QA turns that did not fit in the
    processor's `max_length` are counted in the batch's `dropped_turns` (the trainer sums them in the main process,
    since collators may run in dataloader workers) and in `self.dropped_turns`.
    """

    def __init__(
        self,
        processor: CoMaProcessor,
        image_root: str | None = None,
        max_turns: int | None = None,
    ):
        self.processor = processor
        self.image_root = image_root
        self.max_turns = max_turns
        self.dropped_turns = 0

    def __call__(self, rows: list[dict[str, Any]]) -> BatchFeature:
        rendered, ids = [], []
        for position, row in enumerate(rows):
            record = normalize_stage1_record(row, position, self.image_root)
            ids.append(str(record["id"]))
            rendered.append(
                processor_method(self.processor, "render_qa_sample")(
                    record["image"],
                    record["text"],
                    record["conversation"][: self.max_turns],
                    sample=record["id"],
                )
            )
        batch = self.processor.collate(rendered)
        dropped = sum(sample.dropped_turns for sample in rendered)
        self.dropped_turns += dropped
        batch[BatchKey.DROPPED_TURNS] = torch.tensor(dropped)
        batch[BatchKey.SAMPLE_IDS] = ids  # named when the loss is not finite
        return batch


class CoMaContrastiveCollator(SentenceTransformerDataCollator):
    """Stage-2 rows (`{side}_text` / `{side}_image` columns, see `coma_hf.data.stage2`) → one sentence-transformers
    input per side, in loss order (anchor, positive[, negative]).

    The negative column takes part when any row of the batch has a negative (MMEB-train leaves most of them empty;
    the loss takes any number of columns per batch). The rows without one get `MISSING_NEGATIVE` (a short text: the
    column must be rectangular) and the batch a `negative_present` mask, with which `CoMaContrastiveLoss` leaves those
    placeholders out of every denominator. Other columns (`dataset`) are dropped.
    """

    MISSING_NEGATIVE = {"text": "no hard negative"}

    def __call__(self, features: list[dict]) -> dict:
        has_negative = [len(sides(row)) == 3 for row in features]
        columns = ["anchor", "positive", "negative"] if any(has_negative) else ["anchor", "positive"]
        rows = []
        for row in features:
            if row.get(ERROR_COLUMN):  # a row that did not load (--validate_data / --skip_bad_samples skip it)
                raise CoMaInputError(row[ERROR_COLUMN])
            inputs = {side: self._side_input(row, side) for side in columns}
            if "dataset_name" in row:
                inputs["dataset_name"] = row["dataset_name"]
            rows.append(inputs)
        batch = super().__call__(rows)
        if "negative" in columns and not all(has_negative):
            batch[f"negative_{BatchKey.PRESENT}"] = torch.tensor(has_negative)
        if "id" in features[0]:
            batch[BatchKey.SAMPLE_IDS] = [row["id"] for row in features]  # named when the loss is not finite
        return batch

    def _side_input(self, row: dict, side: str) -> dict[str, Any]:
        """The embedding input of one side of `row`; the placeholder for a negative the row lacks."""
        if side == "negative" and len(sides(row)) < 3:
            return dict(self.MISSING_NEGATIVE)
        return embedding_input(row[f"{side}_text"], row[f"{side}_image"])
