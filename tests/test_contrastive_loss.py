"""CoMaContrastiveLoss: InfoNCE as written in the paper, duplicate positives masked, GradCache = plain."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from coma_hf.training import CoMaContrastiveCollator, CoMaContrastiveTrainer, losses
from coma_hf.training.losses import CoMaContrastiveLoss, input_keys

from utils import random_image, tiny_sentence_transformer

TAU = 0.05


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    model = copy.deepcopy(tiny_sentence_transformer(tmp_path_factory))
    model.train()
    return model


def _features(st, column):
    return st.preprocess(column)


def _embed(st, column):
    with torch.no_grad():
        return st(_features(st, column))["sentence_embedding"]


def _hand_loss(queries, columns, excluded=lambda i, j: False, symmetric=False, tau=TAU):
    """The loss with explicit loops: row i against every candidate of every column, minus excluded positives."""
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    positives = columns[0]
    total = 0.0
    for i in range(len(queries)):
        denominator = 0.0
        for c, column in enumerate(columns):
            for j in range(len(column)):
                if c == 0 and j != i and excluded(i, j):
                    continue
                denominator += math.exp(cos(queries[i], column[j]) / tau)
        forward = -(cos(queries[i], positives[i]) / tau - math.log(denominator))
        if symmetric:
            back = sum(
                math.exp(cos(positives[i], queries[j]) / tau)
                for j in range(len(queries))
                if j == i or not excluded(i, j)
            )
            forward = (forward - (cos(queries[i], positives[i]) / tau - math.log(back))) / 2
        total += forward
    return total / len(queries)


ANCHORS = ["a red circle", "two blue squares", "a green triangle", "the digit seven"]
POSITIVES = ["red", "blue", "green", "seven"]
NEGATIVES = ["yellow", "purple", "orange", "three"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_equals_hand_computation_with_hard_negatives(st, symmetric):
    loss_fn = CoMaContrastiveLoss(st, temperature=TAU, cached=False, symmetric=symmetric)
    columns = [ANCHORS, POSITIVES, NEGATIVES]
    with torch.no_grad():
        loss = loss_fn([_features(st, column) for column in columns], None)
        without_negatives = loss_fn([_features(st, column) for column in columns[:2]], None)
    queries, positives, negatives = (_embed(st, column) for column in columns)
    expected = _hand_loss(queries, [positives, negatives], symmetric=symmetric)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # hard negatives enter the denominator: the loss grows (the symmetric term never sees them)
    assert loss.item() > without_negatives.item()
    assert without_negatives.item() == pytest.approx(_hand_loss(queries, [positives], symmetric=symmetric), rel=1e-5)


def test_duplicate_positives_are_not_negatives(st):
    positives = ["red", "blue", "red", "seven"]  # rows 0 and 2 share their positive
    columns = [ANCHORS, positives]
    features = [_features(st, column) for column in columns]
    keys = input_keys(features[1])
    assert keys[0] == keys[2] and len(set(keys.tolist())) == 3

    with torch.no_grad():
        masked = CoMaContrastiveLoss(st, temperature=TAU, cached=False)(features, None)
        unmasked = CoMaContrastiveLoss(st, temperature=TAU, cached=False, mask_duplicate_positives=False)(
            features, None
        )
    queries, embedded = _embed(st, ANCHORS), _embed(st, positives)
    duplicate = lambda i, j: {i, j} == {0, 2}  # noqa: E731
    assert masked.item() == pytest.approx(_hand_loss(queries, [embedded], excluded=duplicate), rel=1e-5)
    assert unmasked.item() == pytest.approx(_hand_loss(queries, [embedded]), rel=1e-5)
    assert masked.item() < unmasked.item()


def test_image_inputs_differ_by_pixels_not_only_by_tokens(st):
    same_size = [{"image": random_image(1)}, {"image": random_image(2)}, {"image": random_image(1)}]
    keys = input_keys(_features(st, same_size)).tolist()
    assert keys[0] == keys[2] != keys[1]


def _batch(size):
    anchors = [
        {"image": random_image(i), "text": f"picture {i}"} if i % 2 else f"caption number {i}" for i in range(size)
    ]
    positives = [f"label {i % 5}" for i in range(size)]
    negatives = [{"image": random_image(100 + i)} for i in range(size)]
    return [anchors, positives, negatives]


def _loss_and_grads(st, loss_fn, columns):
    st.zero_grad()
    loss = loss_fn([_features(st, column) for column in columns], None)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in st.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_cached_mode_gives_the_plain_loss_and_gradients(st):
    columns = _batch(6)
    plain_loss, plain_grads = _loss_and_grads(st, CoMaContrastiveLoss(st, cached=False, symmetric=True), columns)
    cached_loss, cached_grads = _loss_and_grads(
        st, CoMaContrastiveLoss(st, cached=True, mini_batch_size=2, symmetric=True), columns
    )
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():  # float32; the mini-batches only change summation order
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class _SavedBytes:
    """Peak bytes of activations held for backward (parameters excluded), via saved-tensor hooks."""

    def __init__(self, parameters):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.live = self.peak = 0

    def pack(self, tensor):
        meter = self

        class Held:
            def __init__(self):
                self.tensor = tensor
                self.size = (
                    0
                    if tensor.untyped_storage().data_ptr() in meter.parameter_storages
                    else (tensor.numel() * tensor.element_size())
                )
                meter.live += self.size
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.size

        return Held()

    @staticmethod
    def unpack(held):
        return held.tensor


def _peak_saved_bytes(st, loss_fn, columns) -> int:
    meter = _SavedBytes(st.parameters())
    st.zero_grad()
    features = [_features(st, column) for column in columns]
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        loss_fn(features, None).backward()
    return meter.peak


def test_cached_mode_keeps_fewer_saved_activations_for_a_larger_batch(st):
    plain = _peak_saved_bytes(st, CoMaContrastiveLoss(st, cached=False), _batch(8))
    cached = _peak_saved_bytes(st, CoMaContrastiveLoss(st, cached=True, mini_batch_size=2), _batch(16))
    assert 0 < cached < plain / 2, (cached, plain)


def test_matryoshka_wraps_the_cached_loss(st):
    columns = [ANCHORS, POSITIVES]
    features = [_features(st, column) for column in columns]
    loss = MatryoshkaLoss(st, CoMaContrastiveLoss(st, temperature=TAU, mini_batch_size=2), matryoshka_dims=[64, 16])
    with torch.no_grad():
        value = loss(features, None)
    queries, positives = _embed(st, ANCHORS), _embed(st, POSITIVES)
    expected = sum(_hand_loss(queries[:, :dim], [positives[:, :dim]]) for dim in (64, 16))
    assert value.item() == pytest.approx(expected, rel=1e-5)


PARTIAL_POSITIVES = ["red", "blue", "red", "seven"]  # rows 0 and 2 share their positive
PARTIAL_NEGATIVES = ["yellow", None, "orange", None]  # rows 1 and 3 have no hard negative


def _stage2_rows(anchors, positives, negatives) -> list[dict]:
    """Rows as `load_mmeb_train` gives them; a `None` negative is a row without one (MMEB-train's empty columns)."""
    return [
        {
            "anchor_text": anchor,
            "anchor_image": "",
            "positive_text": positive,
            "positive_image": "",
            "negative_text": negative or "",
            "negative_image": "",
            "dataset": "toy",
        }
        for anchor, positive, negative in zip(anchors, positives, negatives, strict=False)
    ]


def _trainer_loss(st, loss_fn, rows, output_dir):
    """The loss of `rows` along the training path: the collator, then the trainer's `compute_loss`."""
    args = SentenceTransformerTrainingArguments(output_dir=str(output_dir), report_to=[], use_cpu=True)
    trainer = CoMaContrastiveTrainer(model=st, args=args, loss=loss_fn)
    return trainer.compute_loss(st, trainer.data_collator(rows))


def _loss_columns(batch: dict) -> list[dict]:
    """A collated batch split into the loss's columns, as the trainer splits it."""
    return [
        {key[len(side) + 1 :]: value for key, value in batch.items() if key.startswith(side + "_")}
        for side in ("anchor", "positive", "negative")
        if f"{side}_input_ids" in batch
    ]


def _partial_features(st) -> list[dict]:
    rows = _stage2_rows(ANCHORS, PARTIAL_POSITIVES, PARTIAL_NEGATIVES)
    batch = CoMaContrastiveCollator(preprocess_fn=st.preprocess)(rows)
    assert batch["negative_present"].tolist() == [negative is not None for negative in PARTIAL_NEGATIVES]
    return _loss_columns(batch)


def _hand_partial_loss(st, symmetric=False):
    """Candidates: every positive (duplicates masked) and the two hard negatives that exist."""
    queries, positives = _embed(st, ANCHORS), _embed(st, PARTIAL_POSITIVES)
    negatives = _embed(st, [negative for negative in PARTIAL_NEGATIVES if negative])
    duplicate = lambda i, j: PARTIAL_POSITIVES[i] == PARTIAL_POSITIVES[j]  # noqa: E731
    return _hand_loss(queries, [positives, negatives], excluded=duplicate, symmetric=symmetric)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_partial_hard_negatives_keep_the_existing_ones(st, tmp_path, cached, symmetric):
    loss_fn = CoMaContrastiveLoss(st, temperature=TAU, cached=cached, mini_batch_size=3, symmetric=symmetric)
    with torch.no_grad():
        loss = _trainer_loss(st, loss_fn, _stage2_rows(ANCHORS, PARTIAL_POSITIVES, PARTIAL_NEGATIVES), tmp_path)
    assert loss.item() == pytest.approx(_hand_partial_loss(st, symmetric), rel=1e-5)


def test_partial_hard_negatives_cached_gradients_equal_plain(st):
    features = _partial_features(st)
    results = []
    for loss_fn in (CoMaContrastiveLoss(st, cached=False), CoMaContrastiveLoss(st, cached=True, mini_batch_size=3)):
        st.zero_grad()
        loss = loss_fn(features, None)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in st.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain, plain_grads), (cached, cached_grads) = results
    assert torch.isfinite(plain) and cached.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cached", [False, True])
def test_partial_negative_mask_is_gathered_with_the_embeddings(st, monkeypatch, cached):
    """A simulated second process holding the same rows in reverse order: every gather appends the flipped
    tensor, so a mask gathered out of step with the embeddings would mask the wrong candidates."""
    world = lambda tensor: torch.cat([tensor, tensor.flip(0)])  # noqa: E731
    monkeypatch.setattr(losses, "all_gather_with_grad", world)
    monkeypatch.setattr(losses, "all_gather", world)
    features = _partial_features(st)
    loss_fn = CoMaContrastiveLoss(st, temperature=TAU, cached=cached, mini_batch_size=3, gather_across_devices=True)
    with torch.no_grad():
        loss = loss_fn(features, None)

    texts = PARTIAL_POSITIVES + PARTIAL_POSITIVES[::-1]
    negatives = [negative for negative in PARTIAL_NEGATIVES + PARTIAL_NEGATIVES[::-1] if negative]
    duplicate = lambda i, j: texts[i] == texts[j]  # noqa: E731
    expected = _hand_loss(_embed(st, ANCHORS), [_embed(st, texts), _embed(st, negatives)], excluded=duplicate)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_processes_whose_batches_differ_in_negative_columns_gather_alike(st, monkeypatch):
    """One process's batch has hard negatives, another's has none (accelerate shards the batches, so processes can
    be on different datasets at one step): the collectives must still pair up, one for one, shape for shape, and
    in the backward pass too (a gather whose input requires no grad runs no backward collective). Simulated by
    recording each process's gathers; the process without negatives pads an absent column."""
    calls = []

    def world(tensor):
        calls.append((tuple(tensor.shape), tensor.dtype, tensor.requires_grad))
        if tensor.shape == (1,):  # the candidate column counts: 3 on the process with negatives, 2 on the other
            return torch.tensor([3, 2])
        return torch.cat([tensor, tensor.flip(0)])

    monkeypatch.setattr(losses, "all_gather_with_grad", world)
    monkeypatch.setattr(losses, "all_gather", world)
    loss_fn = CoMaContrastiveLoss(st, temperature=1.0, cached=False, gather_across_devices=True)
    sequences = []
    for negatives in (PARTIAL_NEGATIVES, [None] * 4):
        calls.clear()
        rows = _stage2_rows(ANCHORS, PARTIAL_POSITIVES, negatives)
        features = _loss_columns(CoMaContrastiveCollator(preprocess_fn=st.preprocess)(rows))
        loss = loss_fn(features, None)
        sequences.append(list(calls))
    assert len(features) == 2 and sequences[0] == sequences[1]

    # the padded column is absent: the loss is the world's loss without negatives (τ = 1, so it would show)
    texts = PARTIAL_POSITIVES + PARTIAL_POSITIVES[::-1]
    duplicate = lambda i, j: texts[i] == texts[j]  # noqa: E731
    expected = _hand_loss(_embed(st, ANCHORS), [_embed(st, texts)], excluded=duplicate, tau=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_temperature_defaults_to_the_checkpoint_config(st):
    assert CoMaContrastiveLoss(st).scale == pytest.approx(1 / 0.03)
