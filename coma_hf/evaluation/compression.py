"""Does stage 1 compress? Answers decoded from the compression states alone, scored against the references.

* `answer_accuracy`: each question of each held-out sample is asked of that sample's compression states
  (`generate_from_compression`, greedy, up to the longest reference answer's length) and scored by normalised exact
  match and token F1.
* with `control=True` each question is asked of a *different* sample's compression states: what the question
  alone allows (a model that ignores its compression tokens scores the same both ways).
* `majority_baseline`: answer each question type with its most frequent training answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import torch
from transformers.utils.logging import tqdm

from ..data.stage1 import normalize_stage1_record
from ..inputs import CoMaInputError

SCORING = "normalised exact match (case, surrounding space and a final full stop ignored) and token F1"
MAX_ANSWER_TOKENS = 128  # the generation cap for free-form answers
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(answer: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return answer.strip().lower().rstrip(".").strip()


def answer_tokens(answer: str) -> list[str]:
    """Words compared by token F1: lower case, punctuation and articles removed (SQuAD's rule)."""
    text = answer.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall between a generated answer and the reference (1.0 if both empty)."""
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def _questions(records: Sequence[dict]) -> list[tuple[int, str, str, str]]:
    """(record index, question, answer, type) for every turn."""
    return [
        (index, turn["question"], turn["answer"], turn.get("type", "all"))
        for index, record in enumerate(records)
        for turn in record["conversation"]
    ]


def generation_length(processor, records: Sequence[dict], cap: int | None = MAX_ANSWER_TOKENS) -> int:
    """Tokens to generate: the longest reference answer and its `<|im_end|>`, at most `cap` (`None`: uncapped)."""
    answers = [turn["answer"] for record in records for turn in record["conversation"]]
    if not answers:
        return 1
    lengths = processor.tokenizer(answers, add_special_tokens=False)["input_ids"]
    needed = 1 + max(len(ids) for ids in lengths)
    return needed if cap is None else min(cap, needed)


@torch.no_grad()
def answer_accuracy(
    model,
    processor,
    rows: Sequence[dict],
    image_root: str | None = None,
    control: bool = False,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    show_progress_bar: bool = True,
) -> dict:
    """Exact match and token F1 of answers generated from the compression states (overall and per question type).

    `max_new_tokens` defaults to `generation_length` of the rows (it is returned as `max_new_tokens`). With
    `control=True`, sample i's questions are asked of sample i+1's compression states.
    """
    records = [normalize_stage1_record(row, index, image_root) for index, row in enumerate(rows)]
    max_new_tokens = max_new_tokens or generation_length(processor, records)
    was_training = model.training
    model.eval()
    device = model.device
    scores = _Scores()
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
            for (_, _, reference, kind), answer in zip(group, answers, strict=False):
                scores.add(kind, answer, reference)
    model.train(was_training)
    return {**scores.summary(), "max_new_tokens": max_new_tokens}


def majority_baseline(train_rows: Iterable[dict], eval_rows: Sequence[dict]) -> dict:
    """Exact match and token F1 of answering each question type with its most frequent training answer.

    Rows may be in any format `normalize_stage1_record` reads; rows it rejects are left out."""
    answers_by_type: dict[str, Counter] = defaultdict(Counter)
    for record in _records(train_rows):
        for turn in record["conversation"]:
            answers_by_type[turn.get("type", "all")][normalize_answer(turn["answer"])] += 1
    majority = {kind: counts.most_common(1)[0][0] for kind, counts in answers_by_type.items()}
    scores = _Scores()
    for record in _records(eval_rows):
        for turn in record["conversation"]:
            kind = turn.get("type", "all")
            scores.add(kind, majority.get(kind, ""), turn["answer"])
    return {**scores.summary(), "majority_answers": majority}


def _records(rows: Iterable[dict]) -> Iterable[dict]:
    """The rows in the stage-1 schema, leaving out those `normalize_stage1_record` rejects."""
    for index, row in enumerate(rows):
        try:
            yield normalize_stage1_record(row, index)
        except CoMaInputError:
            continue


class _Scores:
    """Exact-match and token-F1 totals per question type."""

    def __init__(self):
        self.correct, self.f1, self.total = Counter(), Counter(), Counter()

    def add(self, kind: str, answer: str, reference: str) -> None:
        self.total[kind] += 1
        self.correct[kind] += normalize_answer(answer) == normalize_answer(reference)
        self.f1[kind] += token_f1(answer, reference)

    def summary(self) -> dict:
        count = sum(self.total.values())
        return {
            "accuracy": sum(self.correct.values()) / count if count else 0.0,
            "f1": sum(self.f1.values()) / count if count else 0.0,
            "per_type": {kind: self.correct[kind] / self.total[kind] for kind in sorted(self.total)},
            "per_type_f1": {kind: self.f1[kind] / self.total[kind] for kind in sorted(self.total)},
            "num_questions": count,
        }
