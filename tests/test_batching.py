"""Left padding changes nothing: a sample alone and inside a batch gives the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils import FAMILIES, random_image, tiny_coma

SAMPLES = [
    {
        "image": random_image(1, (84, 112)),
        "text": "a red circle and a blue square",
        "conversation": [{"question": "What colour is the circle?", "answer": "red"}, ("How many?", "two shapes")],
    },
    {"text": "only text, no picture", "conversation": [{"question": "Is there an image?", "answer": "no"}]},
    {
        "image": random_image(2, (140, 56)),
        "conversation": [("What is left?", "a star"), ("What is right?", "a dot"), ("Anything else?", "nothing")],
    },
]
EMBEDDING_INPUTS = ["a query text", random_image(3), {"image": random_image(4, (56, 168)), "text": "with text"}]


def _per_token_losses(model, batch):
    hidden = model.backbone_hidden_states(**batch)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    losses = F.cross_entropy(model.lm_head(hidden[:, :-1][keep]), targets[keep], reduction="none")
    counts = keep.sum(dim=1).tolist()
    return list(torch.split(losses, counts))


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_alone_equals_sample_in_padded_batch(family):
    model, processor = tiny_coma(family)
    batch = processor.process_qa_samples(SAMPLES)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == 3  # really different lengths
    with torch.no_grad():
        batched_losses = _per_token_losses(model, batch)
        batched = model(**batch)
        for index, sample in enumerate(SAMPLES):
            alone_batch = processor.process_qa_samples([sample])
            alone = model(**alone_batch)
            torch.testing.assert_close(
                batched_losses[index], _per_token_losses(model, alone_batch)[0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(batched.pooler_output[index], alone.pooler_output[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                batched.compression_states[index], alone.compression_states[0], atol=1e-5, rtol=1e-5
            )


def test_batch_loss_is_token_weighted_mean_of_sample_losses():
    model, processor = tiny_coma()
    with torch.no_grad():
        batch_loss = model(**processor.process_qa_samples(SAMPLES)).loss
        losses, tokens = [], []
        for sample in SAMPLES:
            single = processor.process_qa_samples([sample])
            losses.append(model(**single).loss)
            tokens.append(int((single["labels"][:, 1:] != -100).sum()))
    expected = sum(loss * count for loss, count in zip(losses, tokens, strict=False)) / sum(tokens)
    torch.testing.assert_close(batch_loss, expected, atol=1e-5, rtol=1e-5)


def test_loss_is_divided_by_the_global_label_count():
    """With `num_items_in_batch` (Trainer's global count) the loss is the local sum over the global count."""
    model, processor = tiny_coma()
    batch = processor.process_qa_samples(SAMPLES[:2])
    local_count = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean_loss = model(**batch).loss
        global_loss = model(**batch, num_items_in_batch=torch.tensor(4 * local_count)).loss
    torch.testing.assert_close(global_loss * 4, mean_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_alone_equals_embedding_in_batch(family):
    model, processor = tiny_coma(family)
    with torch.no_grad():
        batched = model(**processor.process_embedding_inputs(EMBEDDING_INPUTS, instruction="Find it")).pooler_output
        for index, item in enumerate(EMBEDDING_INPUTS):
            alone = model(**processor.process_embedding_inputs([item], instruction="Find it")).pooler_output
            torch.testing.assert_close(batched[index], alone[0], atol=1e-5, rtol=1e-5)
