"""Property-based tests of `CoMaContrastiveLoss` (issue 27 §1), on a tiny SentenceTransformer per K in {0, 1, 8, 64}:
for generated batches of texts, images and image-text pairs, with and without GradCache (`cached`), with up to two
hard-negative columns some of whose rows are absent (`BatchKey.PRESENT`) and with repeated positives, the loss is
finite, does not depend on the order of the batch's rows, and equals InfoNCE written out below (cosine / temperature,
cross-entropy over the batch's positives and present hard negatives, a row's duplicate positives left out of its
denominator, as the loss's docstring states).

The reference reads the embeddings the model gives the same inputs in the same batches (float32), so that it checks
the loss and not the model's batching (`test_properties.py` checks that). The Hypothesis profile is registered in
`conftest.py`; the example count is in the test's docstring.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from coma_hf.processing_coma import BatchKey
from coma_hf.training.losses import CoMaContrastiveLoss

from utils import tiny_sentence_transformer

KS = (0, 1, 8, 64)
POOL = 6  # distinct inputs a batch's rows are drawn from (so that positives repeat)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """K → a SentenceTransformer over the tiny CoMa checkpoint (copies in eval mode: the cached ones are shared)."""
    return {k: copy.deepcopy(tiny_sentence_transformer(tmp_path_factory, num_compression_tokens=k)).eval() for k in KS}


# Distinct inputs: texts are unique strings (no image placeholder, so each renders differently), images solid colours
# unique across the pool (the loss tells inputs apart by their tokens and pixels).
TEXT = st.text(st.characters(categories=["L", "N", "P", "S"], exclude_characters="<>"), min_size=1, max_size=10)
COLOUR = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
SIZE = st.tuples(st.integers(1, 96), st.integers(1, 96))


@st.composite
def input_pool(draw) -> list:
    """`POOL` distinct inputs: texts, images and `{"image", "text"}` pairs."""
    texts = draw(st.lists(TEXT, min_size=POOL, max_size=POOL, unique=True))
    colours = draw(st.lists(COLOUR, min_size=POOL, max_size=POOL, unique=True))
    kinds = draw(st.lists(st.sampled_from(["text", "image", "pair"]), min_size=POOL, max_size=POOL))
    pool = []
    for text, colour, kind in zip(texts, colours, kinds, strict=True):
        image = Image.new("RGB", draw(SIZE), colour)
        pool.append(
            text if kind == "text" else {"image": image} if kind == "image" else {"image": image, "text": text}
        )
    return pool


def _reference(queries, candidates, present, duplicate, temperature: float, symmetric: bool) -> float:
    """InfoNCE written out, in float64: row i's positive against every positive of the batch except the other rows'
    positives that duplicate its own, and every present hard negative; with `symmetric`, averaged with the
    positive→anchor term (each positive against every anchor but those whose positive duplicates its own)."""
    q = F.normalize(queries.double(), dim=-1)
    columns = [F.normalize(column.double(), dim=-1) for column in candidates]
    rows = range(len(q))
    forward, backward = [], []
    for i in rows:
        positive = float(q[i] @ columns[0][i]) / temperature
        logits = [float(q[i] @ columns[0][j]) / temperature for j in rows if j == i or not duplicate[i][j]]
        for column, marks in zip(columns[1:], present, strict=True):
            logits += [float(q[i] @ column[j]) / temperature for j in rows if marks[j]]
        forward.append(torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0).item() - positive)
        logits = [float(columns[0][i] @ q[j]) / temperature for j in rows if j == i or not duplicate[i][j]]
        backward.append(torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0).item() - positive)
    loss = sum(forward) / len(forward)
    return (loss + sum(backward) / len(backward)) / 2 if symmetric else loss


def _features(model, columns: list[list], present: list[list[bool] | None]) -> list[dict]:
    """The loss's input: one preprocessed column per side, `BatchKey.PRESENT` on the negative columns that have it."""
    features = [model.preprocess(column) for column in columns]
    for column, marks in zip(features[2:], present, strict=True):
        if marks is not None:
            column[BatchKey.PRESENT] = torch.tensor(marks)
    return features


@settings(max_examples=15)
@given(data=st.data())
def test_contrastive_loss_is_finite_order_free_and_infonce(models, data):
    """15 examples. Batches of 2–4 rows drawn from a pool of distinct inputs (positives repeat), each without hard
    negatives and with 1–2 hard-negative columns (absent rows or not), plain and cached (any mini-batch size), one-way
    or symmetric: the loss is finite, the same for any order of the rows (within 1e-5), and equals the InfoNCE
    reference: without the cache, which embeds each column as the reference's embeddings were, within 1e-6 (or, where
    coarser, float32's resolution of the logits, 4 ulp of 1 / τ); cached mini-batches pad otherwise, so within 1e-5
    (or ten times that resolution)."""
    k = data.draw(st.sampled_from(KS), label="K")
    model = models[k]
    pool = data.draw(input_pool(), label="pool")
    size = data.draw(st.integers(2, 4), label="rows")
    index = st.integers(0, POOL - 1)
    anchors = data.draw(st.lists(index, min_size=size, max_size=size), label="anchors")
    positives = data.draw(st.lists(index, min_size=size, max_size=size), label="positives")
    count = data.draw(st.integers(1, 2), label="hard-negative columns")
    negatives = [data.draw(st.lists(index, min_size=size, max_size=size), label="negatives") for _ in range(count)]
    marks = st.lists(st.booleans(), min_size=size, max_size=size)
    present = [data.draw(st.one_of(marks, st.none()), label="present") for _ in range(count)]  # None: all present
    absent = any(not mark for mask in present if mask is not None for mark in mask)
    event(f"hard-negative columns: {count}, absent rows: {absent}, repeated positives: {len(set(positives)) < size}")
    temperature = data.draw(st.sampled_from([0.03, 0.1, 1.0]), label="temperature")
    symmetric = data.draw(st.booleans(), label="symmetric")
    mini_batch_size = data.draw(st.integers(1, size), label="mini_batch_size")
    order = data.draw(st.permutations(range(size)), label="order")
    # float32 logits s / τ carry rounding errors of a few ulp of 1 / τ: 1e-6, or that where it is coarser
    resolution = max(1e-6, 4 * torch.finfo(torch.float32).eps / temperature)
    rows = list(range(size))
    duplicate = [[positives[i] == positives[j] for j in rows] for i in rows]

    def loss(cached: bool, order: list[int], negatives: list[list[int]], present: list) -> float:
        columns = [[pool[column[row]] for row in order] for column in [anchors, positives, *negatives]]
        marks = [None if mask is None else [mask[row] for row in order] for mask in present]
        loss_fn = CoMaContrastiveLoss(
            model, temperature=temperature, cached=cached, mini_batch_size=mini_batch_size, symmetric=symmetric
        )
        with torch.no_grad():
            value = loss_fn(_features(model, columns, marks), None)
        assert torch.isfinite(value), (cached, order)
        return value.item()

    for negative_columns, negative_present in (([], []), (negatives, present)):  # without and with hard negatives
        plain, cached = (loss(mode, rows, negative_columns, negative_present) for mode in (False, True))
        for mode, value in ((False, plain), (True, cached)):
            permuted = loss(mode, list(order), negative_columns, negative_present)
            assert permuted == pytest.approx(value, rel=1e-5, abs=1e-6)

        with torch.no_grad():  # the embeddings the plain loss reads: each column in one batch
            embedded = [
                model(model.preprocess([pool[item] for item in column]))["sentence_embedding"]
                for column in [anchors, positives, *negative_columns]
            ]
        marks = [[True] * size if mask is None else mask for mask in negative_present]
        expected = _reference(embedded[0], embedded[1:], marks, duplicate, temperature, symmetric)
        assert plain == pytest.approx(expected, rel=1e-6, abs=resolution)
        assert cached == pytest.approx(expected, rel=1e-5, abs=10 * resolution)
