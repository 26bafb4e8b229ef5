"""Stage 1's objectives: cross-entropy on the answers, token-level KL to a frozen teacher, or both.

CoMa (arXiv 2511.08480) trains stage 1 with next-token cross-entropy on the answer tokens, P(A | C(X) ⊕ Q). Its
ablation also distils a frozen teacher that sees the full input into the student that reads it only through the K
compression tokens (cross-entropy won). `OBJECTIVES` names the three choices of `CoMaCompressionTrainer` and
`examples/pretrain.py --objective`:

- `ce`: the model's own loss (`CoMaModel.forward` with `labels`);
- `kl`: Σ over label tokens of KL(p_teacher ‖ p_student), divided by the label tokens of the global batch (as the
  cross-entropy is, so accumulation and several processes give the same loss);
- `ce+kl`: `ce + kl_weight · kl`.

Teacher and student. The teacher is a frozen copy of the starting model (`frozen_teacher`). It reads each sample
*directly*: the student's sequence with the K compression tokens removed (`teacher_inputs`: the input, the compress
instruction, then the dialogue) under plain causal attention. The student is CoMa, whose dialogue sees the input only
through the compression tokens. Both sequences carry the same label tokens in the same order, so the positions that
predict them (the position before each label token) pair up one to one (`align_answer_states`).

The divergence is trl's `ChunkedDivergenceFunction` (`trl.kernels.chunked_divergence`, trl ≥ 1.16; beta 0 is the
forward KL) on the aligned final hidden states and both LM heads: full-vocabulary logits are never materialised, the
gradient reaches the student only, and it has a CPU fallback. trl is imported here, lazily, only when a KL objective
runs (`forward_kl`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..constants_coma import IGNORE_INDEX, BatchKey

if TYPE_CHECKING:
    from ..modeling_coma import CoMaModel

OBJECTIVES = ("ce", "kl", "ce+kl")  # stage 1: cross-entropy (the paper's), KL to a frozen teacher, their sum
MIN_TRL_VERSION = "1.16"  # the first trl whose kernels hold `chunked_divergence`
# Per-token entries of a stage-1 batch: the ones the teacher's sequence drops the compression positions from.
PER_TOKEN_KEYS = (BatchKey.INPUT_IDS, BatchKey.ATTENTION_MASK, BatchKey.IMAGE_TOKENS, BatchKey.LABELS)


def check_objective(objective: str, kl_weight: float = 1.0) -> None:
    """Raise `ValueError` for an objective not in `OBJECTIVES`, or a `kl_weight` that is not a finite number > 0."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight > 0):
        raise ValueError(f"kl_weight must be a finite number > 0, got {kl_weight!r}")


def uses_teacher(objective: str) -> bool:
    """Whether `objective` (one of `OBJECTIVES`) has a KL term, and so needs a teacher."""
    return "kl" in objective.split("+")


def frozen_teacher(model: CoMaModel) -> CoMaModel:
    """A frozen copy of `model` (a plain `CoMaModel`, before any LoRA is applied): its own weights, in eval mode,
    with no parameter requiring a gradient. Training the student never changes it."""
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The KL teacher is a copy of the starting model: make it with frozen_teacher(model) before apply_lora, "
            "and pass it to CoMaCompressionTrainer(teacher=...)."
        )
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_inputs(batch: dict[str, Any], compression_token_ids: list[int]) -> dict[str, Any]:
    """The teacher's view of a stage-1 batch: every per-token entry (`PER_TOKEN_KEYS`) without the K compression
    positions of each row, `[batch, length]` → `[batch, length - K]`; images (`pixel_values`, `image_grid_thw`) as they
    are. Padding stays where it was (rows lose K tokens each), so a left-padded batch stays left-padded.

    Raises `ValueError` naming the row when a row does not hold exactly the K compression tokens, or when a compression
    position carries a label.
    """
    input_ids = batch[BatchKey.INPUT_IDS]
    is_compression = torch.isin(input_ids, torch.as_tensor(compression_token_ids, device=input_ids.device))
    counts = is_compression.sum(dim=1)
    wrong = torch.nonzero(counts != len(compression_token_ids)).flatten().tolist()
    if wrong:
        raise ValueError(
            f"sample {wrong[0]}, field {BatchKey.INPUT_IDS!r}: the teacher's view drops the "
            f"{len(compression_token_ids)} compression tokens of each row; found {int(counts[wrong[0]])}"
        )
    labels = batch.get(BatchKey.LABELS)
    if labels is not None and bool((labels[is_compression] != IGNORE_INDEX).any()):
        row = int(torch.nonzero(((labels != IGNORE_INDEX) & is_compression).any(dim=1))[0])
        raise ValueError(f"sample {row}, field {BatchKey.LABELS!r}: a compression token carries a label")
    keep = ~is_compression
    rows, length = input_ids.shape[0], input_ids.shape[1] - len(compression_token_ids)
    view = dict(batch)
    for key in PER_TOKEN_KEYS:
        if batch.get(key) is not None:
            view[key] = batch[key][keep].view(rows, length)
    return view


def label_predicting_states(hidden: torch.Tensor, labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(states [N, hidden], targets [N])`: the final states of the positions that predict a label token (position
    t predicts token t + 1) and those label tokens, in row-major order; N = label tokens after the first position.

    `hidden`: `[batch, length, hidden]`; `labels`: `[batch, length]`, `IGNORE_INDEX` where no loss."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


@dataclass
class AlignedAnswerStates:
    """Student and teacher states that predict the same label tokens, row by row and in order.

    Attributes:
        student: `[N, hidden_student]` the student's states (with gradient).
        teacher: `[N, hidden_teacher]` the teacher's states (no gradient).
        targets: `[N]` the label tokens they predict.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    targets: torch.LongTensor


def align_answer_states(
    student_hidden: torch.Tensor,
    student_labels: torch.LongTensor,
    teacher_hidden: torch.Tensor,
    teacher_labels: torch.LongTensor,
) -> AlignedAnswerStates:
    """Pair the student's and the teacher's label-predicting states (`label_predicting_states` of each).

    `*_hidden`: `[batch, length_*, hidden_*]`; `*_labels`: `[batch, length_*]`. Raises `ValueError` when the two
    sequences do not carry the same label tokens in the same order (then no position pairing is meaningful).
    """
    student, targets = label_predicting_states(student_hidden, student_labels)
    teacher, teacher_targets = label_predicting_states(teacher_hidden, teacher_labels)
    if not torch.equal(targets, teacher_targets.to(targets.device)):
        raise ValueError(
            f"teacher and student carry different label tokens ({len(teacher_targets)} and {len(targets)}): "
            "the teacher's sequence must be the student's without the compression tokens"
        )
    return AlignedAnswerStates(student=student, teacher=teacher, targets=targets)


@torch.no_grad()
def teacher_hidden_states(teacher: CoMaModel, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.LongTensor]:
    """`(hidden [batch, length - K, hidden], labels [batch, length - K])`: the teacher's final (post-norm) states over
    its view of the stage-1 `batch` (`teacher_inputs`), under plain causal attention, and the labels of that view."""
    view = teacher_inputs(batch, list(teacher.config.compression_token_ids))
    hidden = teacher.backbone_hidden_states(rule="causal", **view)
    return hidden, view[BatchKey.LABELS]


def _check_trl() -> None:
    """Raise `ImportError` with the install line when trl is missing or older than `MIN_TRL_VERSION`."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("trl")
    except PackageNotFoundError:
        installed = None
    if installed is None or Version(installed) < Version(MIN_TRL_VERSION):
        found = f"trl {installed} is installed" if installed else "trl is not installed"
        raise ImportError(
            f"The KL objective runs trl's chunked divergence, which needs trl>={MIN_TRL_VERSION} ({found}): "
            f"pip install 'trl>={MIN_TRL_VERSION}'"
        )


def forward_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
) -> torch.Tensor:
    """`[N]` token-level forward KL(p_teacher ‖ p_student), p = softmax(hidden · weightᵀ) over the whole vocabulary.

    `*_hidden`: `[N, hidden_*]` aligned states; `*_weight`: `[vocab, hidden_*]` LM-head weights (the same vocabulary).
    Computed by trl's `ChunkedDivergenceFunction` with beta 0 in vocabulary tiles, never materialising `[N, vocab]`
    logits; the gradient reaches `student_hidden` and `student_weight` only.
    """
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"teacher and student LM heads differ in vocabulary ({teacher_weight.shape[0]} and "
            f"{student_weight.shape[0]} rows): the teacher must be a copy of the starting model"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student states against {teacher_hidden.shape[0]} teacher states")
    _check_trl()
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # not in the kernels' __all__

    divergence, _entropy = ChunkedDivergenceFunction.apply(
        student_hidden, student_weight, None, teacher_hidden.detach(), teacher_weight.detach(), None, 0.0
    )
    return divergence


def answer_kl_sum(
    student_hidden: torch.Tensor,
    labels: torch.LongTensor,
    student_weight: torch.Tensor,
    teacher: CoMaModel,
    batch: dict[str, Any],
) -> torch.Tensor:
    """Scalar: Σ over the label tokens of `batch` of KL(p_teacher ‖ p_student) (`forward_kl` on `align_answer_states`).

    `student_hidden`: `[batch, length, hidden]` the student's final states over `batch` (with gradient); `labels`:
    `[batch, length]`; `student_weight`: `[vocab, hidden]` the student's LM-head weight as its forward uses it;
    `teacher`: the frozen teacher (`frozen_teacher`), which reads `teacher_inputs(batch)`. Divide by the label count
    for the loss."""
    teacher_hidden, teacher_labels = teacher_hidden_states(teacher, batch)
    aligned = align_answer_states(student_hidden, labels, teacher_hidden, teacher_labels)
    teacher_weight = teacher.get_output_embeddings().weight
    return forward_kl(aligned.student, student_weight, aligned.teacher, teacher_weight).sum()
