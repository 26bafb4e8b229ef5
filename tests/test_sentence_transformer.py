"""CoMa checkpoints are SentenceTransformers: same vectors as AutoModel, prompts in the instruction slot, order
kept."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from coma_hf import CoMaInputError
from coma_hf.sentence_transformer import load_sentence_transformer

from utils import random_image, run_without_coma, tiny_coma

# A fresh interpreter in which `import coma_hf` fails (`run_without_coma`): AutoModel and SentenceTransformer from the
# same folder.
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    folder, image_path, output = sys.argv[1:4]
    image = Image.open(image_path)
    texts = ["a red circle left of a blue square", "the digit seven"]
    mixed = [image, "some text", {"image": image, "text": "a question"}, {"image": image_path, "text": "by path"}]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    assert "coma_hf" not in type(model).__module__
    encode = lambda inputs, **kwargs: st.encode(inputs, convert_to_tensor=True, **kwargs)
    torch.save({
        "auto_text": model.encode_text(texts), "st_text": encode(texts),
        "auto_images": model.encode_images([image, image_path]), "st_images": encode([image, image_path]),
        "auto_mixed": model.encode(mixed), "st_mixed": encode(mixed),
        "auto_query": model.encode_query(mixed), "st_query": encode(mixed, prompt_name="query"),
        "auto_document": model.encode_document(texts), "st_document": encode(texts, prompt_name="document"),
        "similarity": st.similarity(encode(texts), encode([image, image_path])),
        "dimension": st.get_embedding_dimension(),
    }, output)
    """
)


@pytest.mark.slow
def test_same_vectors_through_automodel_and_sentence_transformer_without_coma_hf(tmp_path):
    model, _ = tiny_coma()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    assert {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"} <= set(
        os.listdir(folder)
    )
    image_path = tmp_path / "image.png"
    random_image(3).save(image_path)
    run_without_coma(CHILD, [folder, image_path, tmp_path / "out.pt"], tmp_path / "home", tmp_path)
    out = torch.load(tmp_path / "out.pt")
    for name in ("text", "images", "mixed", "query", "document"):
        torch.testing.assert_close(out[f"st_{name}"], out[f"auto_{name}"], atol=1e-5, rtol=0, msg=name)
    # the prompt reaches the instruction slot: query vectors differ from plain ones
    assert (out["st_query"] - out["st_mixed"]).abs().max() > 1e-3
    torch.testing.assert_close(out["similarity"], out["auto_text"] @ out["auto_images"].T, atol=1e-5, rtol=0)
    assert out["dimension"] == model.config.embedding_size


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    from utils import tiny_sentence_transformer

    return tiny_sentence_transformer(tmp_path_factory)


def test_mixed_lists_keep_their_order(st):
    model, _ = tiny_coma()
    items = [
        random_image(1),
        "first text",
        {"image": random_image(2), "text": "caption"},
        "second text",
        {"image": random_image(3)},
        random_image(4),
    ]
    one_by_one = torch.cat([model.encode([item]) for item in items])
    together = st.encode(items, convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    order = [5, 2, 0, 3, 1, 4]
    shuffled = st.encode([items[index] for index in order], convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(shuffled, one_by_one[order], atol=1e-5, rtol=0)


def test_mmeb_rows_keep_their_own_instruction(st):
    """A text with an image placeholder carries its instruction; the prompt does not add another."""
    row = {"image": random_image(5), "text": "<|image_1|> Represent the given image for classification"}
    plain = st.encode([row], convert_to_tensor=True)
    with_prompt = st.encode([row], prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(with_prompt, plain, atol=0, rtol=0)


def test_messages_that_are_not_one_input_are_refused(st):
    processor = st[0].processor
    two_images = [
        {
            "role": "user",
            "content": [{"type": "image", "image": random_image(1)}, {"type": "image", "image": random_image(2)}],
        }
    ]
    with pytest.raises(CoMaInputError, match=r"sample 0, field 'image'.*2 images"):
        processor.apply_chat_template(two_images, tokenize=True)
    pair = [[{"role": "query", "content": "q"}, {"role": "document", "content": "d"}]]
    with pytest.raises(CoMaInputError, match=r"role 'query'"):
        processor.apply_chat_template(pair, tokenize=True)


def test_load_sentence_transformer_takes_folders_without_the_sentence_transformers_files(tmp_path):
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        os.remove(tmp_path / name)
    st = load_sentence_transformer(str(tmp_path), device="cpu")
    inputs = ["a text", random_image(6)]
    torch.testing.assert_close(st.encode(inputs, convert_to_tensor=True), model.encode(inputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        st.encode(inputs, prompt_name="query", convert_to_tensor=True), model.encode_query(inputs), atol=1e-5, rtol=0
    )


def test_multi_vector_encoder_scores_the_k_states_with_maxsim(tmp_path):
    from coma_hf.sentence_transformer import load_multi_vector_encoder

    model, processor = tiny_coma()
    model.save_pretrained(tmp_path)
    mve = load_multi_vector_encoder(str(tmp_path), device="cpu")
    queries = ["a red circle", {"image": random_image(1), "text": "what colour?"}]
    documents = [random_image(2), "blue", {"image": random_image(3)}]
    scores = mve.similarity(mve.encode(queries, prompt_name="query"), mve.encode(documents))

    def states(items, instruction=None):
        with torch.no_grad():
            batch = processor.process_embedding_inputs(items, instruction=instruction)
            return torch.nn.functional.normalize(model.compress(**batch).compression_states, dim=-1)

    query_states, document_states = states(queries, model.processor.query_instruction), states(documents)
    assert query_states.shape[1] == model.config.num_compression_tokens
    for i in range(len(queries)):
        for j in range(len(documents)):
            maxsim = sum(max(float(q @ d) for d in document_states[j]) for q in query_states[i])
            assert float(scores[i, j]) == pytest.approx(maxsim, abs=1e-4)


def test_multi_vector_losses_train_coma(tmp_path):
    from sentence_transformers.multi_vector_encoder.losses import CachedMultiVectorMultipleNegativesRankingLoss

    from coma_hf.sentence_transformer import load_multi_vector_encoder

    model, _ = tiny_coma()
    model.save_pretrained(tmp_path)
    mve = load_multi_vector_encoder(str(tmp_path), device="cpu")
    loss_fn = CachedMultiVectorMultipleNegativesRankingLoss(mve, mini_batch_size=2)
    anchors = [random_image(i) for i in range(4)]
    positives = ["red one", "blue two", "green three", "yellow four"]
    features = [mve.preprocess(anchors), mve.preprocess(positives)]
    optimizer = torch.optim.SGD(mve.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = loss_fn([dict(feature) for feature in features], None)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_truncated_embeddings_report_their_dimension(tmp_path):
    from sentence_transformers import SentenceTransformer

    from coma_hf.tiny import build_tiny_coma

    model, _ = build_tiny_coma("qwen2_vl", num_compression_tokens=2, embedding_dim=16)
    model.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    vectors = st.encode(["a text", random_image(0)], convert_to_tensor=True)
    assert st.get_embedding_dimension() == 16 and vectors.shape == (2, 16)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
