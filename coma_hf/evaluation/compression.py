"""Does stage 1 compress? Answers decoded from the compression states alone, scored by exact match.

* `answer_accuracy`: each question of each held-out sample is asked of that sample's compression states
  (`generate_from_compression`, greedy) and compared with the reference answer.
* with `control=True` each question is asked of a *different* sample's compression states: what the question
  alone allows (a model that ignores its compression tokens scores the same both ways).
* `majority_baseline`: answer each question type with its most frequent training answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from transformers.utils.logging import tqdm

from ..data.stage1 import normalize_stage1_record


def normalize_answer(answer: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return answer.strip().lower().rstrip(".").strip()


def _questions(records: Sequence[dict]) -> list[tuple[int, str, str, str]]:
    """(record index, question, answer, type) for every turn."""
    return [
        (index, turn["question"], turn["answer"], turn.get("type", "all"))
        for index, record in enumerate(records)
        for turn in record["conversation"]
    ]


@torch.no_grad()
def answer_accuracy(
    model,
    processor,
    rows: Sequence[dict],
    image_root: str | None = None,
    control: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    show_progress_bar: bool = True,
) -> dict:
    """Exact-match accuracy of answers generated from the compression states (overall and per question type).

    With `control=True`, sample i's questions are asked of sample i+1's compression states.
    """
    records = [normalize_stage1_record(row, index, image_root) for index, row in enumerate(rows)]
    was_training = model.training
    model.eval()
    device = model.device
    correct, total = Counter(), Counter()
    for start in tqdm(range(0, len(records), batch_size), desc="Answering", disable=not show_progress_bar):
        chunk = records[start : start + batch_size]
        sources = [(start + offset + 1) % len(records) if control else start + offset for offset in range(len(chunk))]
        compressed = [records[index] for index in sources]
        inputs = processor.process_compression_inputs(compressed, offset=start).to(device)
        compression = model.compress(**inputs)
        asked = _questions(chunk)
        for first in range(0, len(asked), batch_size):
            group = asked[first : first + batch_size]
            answers = model.generate_from_compression(
                compression.select([row for row, *_ in group]),
                [question for _, question, _, _ in group],
                max_new_tokens=max_new_tokens,
                processor=processor,
            )
            for (_, _, reference, kind), answer in zip(group, answers):
                total[kind] += 1
                correct[kind] += normalize_answer(answer) == normalize_answer(reference)
    model.train(was_training)
    return _summary(correct, total)


def majority_baseline(train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> dict:
    """Accuracy of answering each question type with its most frequent training answer."""
    answers_by_type: dict[str, Counter] = defaultdict(Counter)
    for row in train_rows:
        for turn in row["conversation"]:
            answers_by_type[turn.get("type", "all")][normalize_answer(turn["answer"])] += 1
    majority = {kind: counts.most_common(1)[0][0] for kind, counts in answers_by_type.items()}
    correct, total = Counter(), Counter()
    for row in eval_rows:
        for turn in row["conversation"]:
            kind = turn.get("type", "all")
            total[kind] += 1
            correct[kind] += majority.get(kind) == normalize_answer(turn["answer"])
    return {**_summary(correct, total), "majority_answers": majority}


def _summary(correct: Counter, total: Counter) -> dict:
    count = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / count if count else 0.0,
        "per_type": {kind: correct[kind] / total[kind] for kind in sorted(total)},
        "num_questions": count,
    }
