"""The bottleneck rule as flex attention's `BlockMask` (`masking.block_mask`): the same mask as the dense one, the
same vectors and stage-1 loss as sdpa on every family, asked for the usual way, and refused for training on CPU."""

from __future__ import annotations

import pytest
import torch

from coma_hf import CoMaModel
from coma_hf.masking import attention_allowed, block_mask
from coma_hf.tiny import build_tiny_coma

from utils import FAMILIES, random_image, training_args

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes while it compiles flex attention

INPUTS = [
    "a red circle",
    {"image": random_image(1), "text": "what colour is the square left of the large blue triangle?"},
    {"image": random_image(2, (56, 84))},
    "three shapes and a digit, the digit is seven and the shapes are a star, a cross and a ring",
]


def _dense_from_block_mask(mask, batch: int, length: int) -> torch.Tensor:
    """`[batch, length, length]` booleans as flex attention applies a `BlockMask`: a full block allowed whole, a
    partial block by its `mask_mod`, any other block skipped."""
    size = mask.BLOCK_SIZE[0]
    blocks = mask.to_dense()[:, 0].bool()  # [batch, q_blocks, kv_blocks]: the blocks visited at all
    full = torch.zeros_like(blocks)
    for b in range(batch):
        for q_block in range(blocks.shape[1]):
            count = int(mask.full_kv_num_blocks[b, 0, q_block])
            full[b, q_block, mask.full_kv_indices[b, 0, q_block, :count].long()] = True
    positions = torch.arange(length)
    query, key = positions.view(1, -1, 1), positions.view(1, 1, -1)
    rows = torch.arange(batch).view(-1, 1, 1)
    by_mod = mask.mask_mod(rows, 0, query, key)
    visited = blocks[rows, query // size, key // size]
    whole = full[rows, query // size, key // size]
    return whole | (visited & ~whole & by_mod)


@pytest.mark.parametrize("rule", ["bottleneck", "causal"])
def test_the_block_mask_has_torchs_blocks(rule):
    """The same blocks as torch's own `create_block_mask` over the same `mask_mod` (uncompiled: it builds the dense
    mask, which `block_mask` avoids), at a length that is no multiple of the block."""
    from torch.nn.attention.flex_attention import create_block_mask

    padding = torch.ones(2, 70, dtype=torch.long)
    padding[1, :21] = 0
    mask = block_mask(padding, torch.tensor([40, 50]), torch.tensor([48, 58]), rule, block_size=16)
    reference = create_block_mask(mask.mask_mod, 2, 1, 70, 70, device="cpu", BLOCK_SIZE=16, _compile=False)
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(mask, name), getattr(reference, name)), name
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        for b in range(2):
            for q_block in range(getattr(mask, counts).shape[-1]):
                count = int(getattr(mask, counts)[b, 0, q_block])
                ours = set(getattr(mask, indices)[b, 0, q_block, :count].tolist())
                assert ours == set(getattr(reference, indices)[b, 0, q_block, :count].tolist())


@pytest.mark.parametrize("rule", ["bottleneck", "causal"])
def test_the_block_mask_is_the_dense_mask_and_skips_blocks(rule):
    batch, length = 3, 70
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, :9] = 0  # left padding
    padding[2, :33] = 0
    start, end = torch.tensor([40, 50, 60]), torch.tensor([48, 58, 68])
    mask = block_mask(padding, start, end, rule, block_size=16)
    dense = _dense_from_block_mask(mask, batch, length)
    assert torch.equal(dense, attention_allowed(padding, start, end, rule))
    visited = mask.to_dense()[:, 0].bool()
    assert not bool(visited.all())  # causal blocks above the diagonal, and the bottleneck's, are skipped
    if rule == "bottleneck":  # the last query block of row 0 (after its compression tokens) skips early key blocks
        assert not bool(visited[0, -1, 0])


def _flex_copy(model: CoMaModel) -> CoMaModel:
    import copy

    flex = copy.deepcopy(model)
    flex.set_attn_implementation("flex_attention")
    return flex


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_encode_and_stage_one_loss_equal_sdpas(family):
    model, processor = build_tiny_coma(family, num_compression_tokens=4)
    model.eval()
    flex = _flex_copy(model)
    assert flex.config.get_text_config()._attn_implementation == "flex_attention"
    assert flex.config.backbone_config.vision_config._attn_implementation != "flex_attention"
    torch.testing.assert_close(flex.encode(INPUTS), model.encode(INPUTS), atol=1e-5, rtol=0)

    samples = [
        {"image": random_image(3), "text": "", "conversation": [{"question": "colour?", "answer": "red"}]},
        {"text": "a blue star", "conversation": [{"question": "what shape?", "answer": "a star"}]},
    ]
    batch = processor.process_qa_samples(samples)
    for rule in ("bottleneck", "causal"):
        model.config.attention_rule = flex.config.attention_rule = rule
        with torch.no_grad():
            torch.testing.assert_close(flex(**batch).loss, model(**batch).loss, atol=1e-5, rtol=0)


def test_flex_with_no_compression_tokens_and_asked_for_at_load(tmp_path):
    model, _ = build_tiny_coma(num_compression_tokens=0)
    model.save_pretrained(tmp_path / "k0")
    flex = CoMaModel.from_pretrained(tmp_path / "k0", attn_implementation="flex_attention")
    assert flex.config.get_text_config()._attn_implementation == "flex_attention"
    torch.testing.assert_close(flex.encode(INPUTS), model.eval().encode(INPUTS), atol=1e-5, rtol=0)


def test_answers_from_the_compression_are_the_same_under_flex():
    model, processor = build_tiny_coma(num_compression_tokens=4)
    model.eval()
    flex = _flex_copy(model)
    batch = processor.process_embedding_inputs(INPUTS[:2])
    questions = ["what colour?", "how many shapes?"]
    expected = model.generate_from_compression(model.compress(**batch), questions, 6, return_token_ids=True)
    answered = flex.generate_from_compression(flex.compress(**batch), questions, 6, return_token_ids=True)
    assert torch.equal(answered, expected)
    assert flex.config.get_text_config()._attn_implementation == "flex_attention"  # restored after decoding


def test_training_under_flex_on_cpu_stops_before_it_starts(tmp_path):
    from coma_hf.training import CoMaCompressionTrainer

    model, processor = build_tiny_coma(num_compression_tokens=4)
    model.set_attn_implementation("flex_attention")
    samples = [{"text": "a red circle", "conversation": [{"question": "colour?", "answer": "red"}]}] * 2
    trainer = CoMaCompressionTrainer(
        model=model, args=training_args(tmp_path, max_steps=1), train_dataset=samples, processing_class=processor
    )
    with pytest.raises(ValueError, match="no backward pass on CPU.*sdpa.*GPU"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_long_padded_inputs_run_through_flex_with_a_block_mask_and_equal_sdpa(monkeypatch):
    """Inputs of several 128-token blocks, rows of different lengths, tokens after the compression tokens (stage 1's
    answers): skipped, full and partial blocks and a short last block all reach the flex kernel, which must be handed
    the `BlockMask` (a dense mask would give the same numbers through flex's score path)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, processor = build_tiny_coma(num_compression_tokens=4, max_length=None)
    model.eval()
    flex = _flex_copy(model)
    words = "a red circle left of two blue squares and a green star above a digit"
    samples = [
        {"text": f"{words} " * 40, "conversation": [{"question": "what colour is the circle?", "answer": "red"}] * 3},
        {
            "image": random_image(4),
            "text": f"{words} " * 12,
            "conversation": [{"question": "how many?", "answer": "3"}],
        },
    ]
    batch = processor.process_qa_samples(samples)
    assert batch["input_ids"].shape[1] > 3 * 128 and batch["input_ids"].shape[1] % 128
    masks = []
    flex_forward = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask)
        return flex_forward(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", spy)
    with torch.no_grad():
        torch.testing.assert_close(flex(**batch).loss, model(**batch).loss, atol=1e-5, rtol=0)
    assert masks and all(isinstance(mask, BlockMask) for mask in masks)
    skipped = ~masks[0].to_dense().bool()
    assert bool(skipped.any())  # the bottleneck and causality skip whole blocks here
    long_inputs = [f"{words} " * 30, {"image": random_image(5), "text": words}]
    torch.testing.assert_close(flex.encode(long_inputs), model.encode(long_inputs), atol=1e-5, rtol=0)


def test_flex_named_in_a_dict_is_refused_with_the_way_to_ask():
    model, _ = build_tiny_coma(num_compression_tokens=4)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        model.set_attn_implementation({"text_config": "flex_attention"})
