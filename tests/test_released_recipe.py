"""`--recipe released` and the global batch: presets, the split of a global batch, the per-sample-mean loss, DoRA with
the tied embedding matrix, the chunked stage-2 batches, per-dataset caps, hard negatives off and evaluation pooling.

The two-process run (`accelerate launch`) that checks a recipe's global batch end to end is in
`tests/test_accelerate.py`."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

from coma_hf.data.stage2 import cap_per_dataset, load_mmeb_train, parse_dataset_caps, split_by_dataset
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.processing_coma import BatchKey
from coma_hf.released import RELEASED_RECIPE
from coma_hf.tiny import build_tiny_coma, tiny_backbone_config
from coma_hf.training import (
    RECIPES,
    BatchArguments,
    CoMaCompressionCollator,
    CoMaCompressionTrainer,
    LoraArguments,
    UniformChunkBatchSampler,
    apply_lora,
    derive_batch_sizes,
    explicit_batch_flags,
    merge_lora,
    per_sample_token_means,
    plan_batch,
    pooling_as,
)
from coma_hf.training.presets import parse_with_recipe, recipe_defaults

from utils import load_example, training_args

STAGES = {"stage1": "pretrain", "stage2": "train_contrastive"}


def _parse(stage: str, argv: list[str], tmp_path):
    """The script's parsed arguments (by type name) and batch plan for `argv`, on this one process."""
    script = load_example(STAGES[stage])
    parsed, _, batch = parse_with_recipe(
        script.ARGUMENTS, [*argv, "--output_dir", str(tmp_path / "out")], stage, script.CONFIGS, lambda args: None
    )
    return {type(value).__name__: value for value in parsed}, batch


# ---- presets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_preset_states_a_global_batch_and_parses(stage, recipe, tmp_path):
    preset = recipe_defaults(recipe, stage, load_example(STAGES[stage]).CONFIGS)
    assert preset["global_train_batch_size"] > 0
    assert "per_device_train_batch_size" not in preset and "gradient_accumulation_steps" not in preset
    parsed, batch = _parse(stage, ["--recipe", recipe, "--bf16", "false"], tmp_path)
    training = next(value for name, value in parsed.items() if name.endswith("TrainingArguments"))
    assert batch.global_batch == preset["global_train_batch_size"] and batch.processes == 1
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (
        batch.per_device,
        batch.accumulation,
    )


def test_the_paper_and_released_recipes_state_their_own_numbers(tmp_path):
    assert RELEASED_RECIPE in RECIPES
    parsed, batch = _parse("stage1", ["--recipe", "released", "--bf16", "false"], tmp_path)
    model, lora, backbone = parsed["ModelArguments"], parsed["LoraArguments"], parsed["BackboneArguments"]
    assert (batch.global_batch, batch.per_device, batch.accumulation) == (256, 1, 256)  # micro-batch 1, as released
    assert model.attention_rule == "causal" and model.loss_on == "all_after_compression"
    assert model.loss_normalization == "per_sample_mean" and backbone.max_length == 8192
    assert lora.use_dora and lora.lora_init == "gaussian" and lora.train_input_embeddings
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (16, 64, 0.1)
    assert parsed["TrainingArguments"].learning_rate == 5e-5 and parsed["TrainingArguments"].num_train_epochs == 1

    parsed, batch = _parse("stage2", ["--recipe", "released", "--bf16", "false"], tmp_path)
    model, data, loss = parsed["ModelArguments"], parsed["DataArguments"], parsed["LossArguments"]
    assert (batch.global_batch, batch.per_device, batch.accumulation) == (1024, 1024, 1)
    assert (model.pooling, model.eval_pooling) == ("mean", "last")
    assert not loss.mask_duplicate_positives and not data.hard_negatives and loss.mini_batch_size == 8
    assert data.dataset_chunk_size == 64 and len(parse_dataset_caps(data.max_pairs_per_dataset)) == 20
    assert parsed["SentenceTransformerTrainingArguments"].max_steps == 1500

    # the paper's text: the same global batches, 8 rows per pass in stage 1
    _, batch = _parse("stage1", ["--recipe", "paper", "--bf16", "false"], tmp_path)
    assert (batch.global_batch, batch.per_device, batch.accumulation) == (256, 8, 32)
    parsed, _ = _parse("stage1", ["--recipe", "paper", "--bf16", "false"], tmp_path)
    assert parsed["ModelArguments"].loss_normalization == "tokens" and parsed["ModelArguments"].loss_on == "answers"


def test_a_preset_stating_both_the_global_and_the_per_device_batch_is_refused(tmp_path):
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"global_train_batch_size": 64, "per_device_train_batch_size": 8}))
    with pytest.raises(SystemExit, match="states global_train_batch_size and per_device_train_batch_size"):
        recipe_defaults(str(preset), "stage1", tmp_path)


def test_a_converted_release_continues_with_the_released_recipe(tmp_path):
    from coma_hf.training import recipe_of_start

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "coma", "embedded_backbone": False}))
    (folder / "conversion_summary.json").write_text(json.dumps({"recipe": RELEASED_RECIPE}))
    assert recipe_of_start(str(folder))[0] == "released"


# ---- the split of a global batch ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ((256, 8), (32, 1)),  # no bound: each process's share in one pass
        ((256, 8, None, None, 1), (1, 32)),  # the released stage 1
        ((256, 8, None, None, 8), (8, 4)),  # the paper's stage 1 on eight GPUs
        ((256, 1, None, None, 8), (8, 32)),  # ... and on one
        ((1024, 8), (128, 1)),  # stage 2 on eight GPUs
        ((96, 2, None, None, 10), (8, 6)),  # the largest micro-batch under the bound that divides the share (48)
        ((256, 8, 4), (4, 8)),  # a given per-device batch: accumulation makes up the rest
        ((256, 8, None, 2), (16, 2)),  # a given accumulation
        ((64, 2, 4, 8), (4, 8)),  # both given and consistent
    ],
)
def test_derive_batch_sizes(arguments, expected):
    per_device, accumulation = derive_batch_sizes(*arguments)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * arguments[1] == arguments[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((256, 3), "The global batch 256 does not divide among 3 processes"),
        ((256, 8, 3), "256 on 8 processes is 32 rows per process, not a multiple of the per-device batch 3"),
        ((256, 8, None, 5), "not a multiple of the accumulation 5"),
        ((64, 2, 4, 4), r"per-device batch 4 × accumulation 4 × 2 processes = 32, not the global batch 64"),
        ((0, 2), "global batch must be positive"),
    ],
)
def test_a_global_batch_that_does_not_split_is_an_error_naming_the_numbers(arguments, message):
    with pytest.raises(ValueError, match=message):
        derive_batch_sizes(*arguments)


def test_explicit_flags_are_read_from_the_command_line_only():
    argv = [
        "--recipe",
        "paper",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps=2",
        "--seed",
        "3",
    ]
    assert explicit_batch_flags(argv) == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    assert explicit_batch_flags(["--global_train_batch_size", "32"]) == {"global_train_batch_size": 32}
    assert explicit_batch_flags([]) == {}


def test_per_device_flags_win_and_the_log_says_the_global_batch_that_results(tmp_path):
    recipe = BatchArguments(global_train_batch_size=16, max_micro_batch_size=16)
    args = training_args(tmp_path, per_device_train_batch_size=2)
    plan = plan_batch(recipe, 2, {"per_device_train_batch_size": 2}, args)
    assert (plan.per_device, plan.accumulation, plan.global_batch) == (2, 1, 4)
    assert plan.describe() == (
        "global batch 4 = per-device batch 2 × accumulation 1 × 2 processes (per-device flags on the command line); "
        "the recipe's global batch is 16"
    )
    # a flag alone replaces its number of the recipe's split (here 1 × 32 on 8 processes), the other one stays
    plan = plan_batch(BatchArguments(256, 1), 8, {"gradient_accumulation_steps": 16}, args)
    assert (plan.per_device, plan.accumulation, plan.global_batch, plan.asked) == (1, 16, 128, 256)
    # both flags: the recipe's split is not needed, even where it would not come out whole
    both = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
    assert plan_batch(recipe, 3, both, args).global_batch == 18
    # with the global batch on the command line as well, the missing number is derived from it
    plan = plan_batch(recipe, 2, {"per_device_train_batch_size": 2, "global_train_batch_size": 16}, args)
    assert (plan.per_device, plan.accumulation, plan.global_batch) == (2, 4, 16)
    # none given: the recipe's global batch, split under its micro-batch bound
    plan = plan_batch(BatchArguments(16, 4), 2, {}, args)
    assert (plan.per_device, plan.accumulation, plan.source) == (4, 2, "derived from the global batch")
    with pytest.raises(SystemExit, match="Cannot split the global batch: The global batch 16 does not divide among 3"):
        plan_batch(recipe, 3, {}, args)


def test_the_scripts_take_the_derived_numbers_and_explicit_flags_win(tmp_path):
    parsed, batch = _parse("stage1", ["--recipe", "tiny", "--global_train_batch_size", "32"], tmp_path)
    assert (batch.per_device, batch.accumulation) == (16, 2)  # the tiny recipe's micro-batch bound is 16
    assert parsed["TrainingArguments"].gradient_accumulation_steps == 2
    parsed, batch = _parse("stage1", ["--recipe", "tiny", "--per_device_train_batch_size", "4"], tmp_path)
    assert (batch.global_batch, parsed["TrainingArguments"].gradient_accumulation_steps) == (4, 1)
    with pytest.raises(SystemExit, match="global batch 30 on 1 processes is 30 rows per process, not a multiple"):
        _parse("stage1", ["--global_train_batch_size", "30", "--gradient_accumulation_steps", "4"], tmp_path)


# ---- the per-sample-mean loss ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four stage-1 rows whose label counts differ (so that the two normalisations differ)."""
    from coma_hf.data.stage1 import load_stage1_dataset

    paths = write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), 24, 2, 2, seed=0, image_size=56)
    dataset, root = load_stage1_dataset(paths["train"])
    _, processor = _fresh_model()
    collator = CoMaCompressionCollator(processor, root)
    counts = {index: int((collator([dataset[index]])[BatchKey.LABELS] != -100).sum()) for index in range(24)}
    chosen = sorted(counts, key=counts.get)[:2] + sorted(counts, key=counts.get)[-2:]
    assert len({counts[index] for index in chosen}) > 1
    return dataset.select(chosen), root


def _fresh_model():
    return build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)


def _model_inputs(batch) -> dict:
    return {key: value for key, value in batch.items() if key not in (BatchKey.SAMPLE_IDS, BatchKey.DROPPED_TURNS)}


def test_per_sample_token_means_by_hand():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8)
    labels = torch.full((3, 6), -100)
    labels[0, 2:5] = torch.tensor([1, 2, 3])  # targets of positions 1..3
    labels[1, 5] = 7
    # row 2 has no label token
    means = per_sample_token_means(hidden, labels, head)
    expected_0 = torch.nn.functional.cross_entropy(head(hidden[0, 1:4]), torch.tensor([1, 2, 3]))
    expected_1 = torch.nn.functional.cross_entropy(head(hidden[1, 4:5]), torch.tensor([7]))
    torch.testing.assert_close(means, torch.stack([expected_0, expected_1, torch.tensor(0.0)]))


@pytest.mark.parametrize("normalization", ["per_sample_mean", "tokens"])
def test_one_accumulated_step_follows_the_loss_computed_by_hand(scenes, tmp_path, normalization):
    """2 rows × 2 accumulation: the step's loss and its SGD update equal the hand-computed loss's over the 4 rows —
    the mean of the per-sample means, or the token-weighted mean."""
    dataset, root = scenes
    model, processor = _fresh_model()
    collator = CoMaCompressionCollator(processor, root)
    batches = [collator([dataset[index]]) for index in range(len(dataset))]
    model.train()
    losses = torch.stack([model(**_model_inputs(batch)).loss for batch in batches])
    counts = torch.tensor([float((batch[BatchKey.LABELS][:, 1:] != -100).sum()) for batch in batches])
    by_sample, by_token = losses.mean(), (losses * counts).sum() / counts.sum()
    assert not torch.isclose(by_sample, by_token, rtol=1e-3)  # the normalisations really differ on these rows
    hand = by_sample if normalization == "per_sample_mean" else by_token
    hand.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    model, processor = _fresh_model()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    learning_rate = 0.1
    args = training_args(
        tmp_path / normalization,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        optim="sgd",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    trainer = CoMaCompressionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
        loss_normalization=normalization,
    )
    trainer.train()
    assert trainer.first_step_rows == 4
    assert trainer.first_step_loss == pytest.approx(float(hand), rel=1e-4)
    compared = 0
    for name, parameter in model.named_parameters():
        step = (before[name] - parameter.detach()) / learning_rate
        torch.testing.assert_close(step, gradients[name], rtol=1e-3, atol=1e-6, msg=name)
        compared += bool(gradients[name].abs().sum() > 0)
    assert compared > 10


def test_per_sample_mean_is_for_the_cross_entropy_objective(tmp_path):
    model, processor = _fresh_model()
    with pytest.raises(ValueError, match="is for the 'ce' objective"):
        CoMaCompressionTrainer(
            model=model,
            args=training_args(tmp_path),
            processing_class=processor,
            objective="kl",
            loss_normalization="per_sample_mean",
        )
    with pytest.raises(ValueError, match="loss_normalization must be one of"):
        CoMaCompressionTrainer(
            model=model, args=training_args(tmp_path), processing_class=processor, loss_normalization="samples"
        )


# ---- DoRA with the embedding matrix ---------------------------------------------------------------------------------
RELEASED_LORA = LoraArguments(
    use_lora=True,
    lora_r=2,
    lora_alpha=8,
    lora_dropout=0.0,
    use_dora=True,
    lora_init="gaussian",
    train_input_embeddings=True,
)


def _lora_a(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for name, p in model.named_parameters() if ".lora_A." in name])


def test_dora_with_gaussian_init_trains_the_embedding_matrix_and_keeps_a_tied_head_tied():
    model, _ = _fresh_model()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the embedded backbone is tied
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(model, RELEASED_LORA)
    assert not [w for w in caught if "tie" in str(w.message).lower()]
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("lora_magnitude_vector" in name for name in trainable)  # DoRA
    assert any("embed_tokens.modules_to_save" in name for name in trainable)  # the whole matrix, not token rows
    assert not any("visual" in name for name in trainable)  # the vision tower and merger stay frozen
    # Gaussian A of std 1/r (peft's default Kaiming-uniform A would have std 1/sqrt(3 · fan_in) here, far below)
    assert 0.9 / 2 < float(_lora_a(peft_model).std()) < 1.1 / 2
    default = apply_lora(_fresh_model()[0], LoraArguments(use_lora=True, lora_r=2, lora_alpha=8, use_dora=True))
    assert float(_lora_a(default).std()) < 0.5 / 2

    # training the embedding copy moves the head with it, and merging keeps the two one matrix
    trained = next(p for name, p in peft_model.named_parameters() if "embed_tokens.modules_to_save" in name)
    with torch.no_grad():
        trained.add_(0.5)
    base = peft_model.get_base_model()
    assert base.get_output_embeddings().weight.data_ptr() == trained.data_ptr()
    merged = merge_lora(peft_model)
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(merged.lm_head.weight, trained.detach())


def test_an_untied_head_is_left_alone():
    backbone = tiny_backbone_config(tie_word_embeddings=False, hidden_size=32, vision_depth=1)
    model, _ = build_tiny_coma(num_compression_tokens=4, backbone_config=backbone)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    head = model.lm_head.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(model, RELEASED_LORA)
    assert not [w for w in caught if "tie" in str(w.message).lower()]
    assert not any(p.requires_grad for name, p in peft_model.named_parameters() if "lm_head" in name)
    torch.testing.assert_close(merge_lora(peft_model).lm_head.weight, head)


# ---- stage-2 batches, caps, negatives, pooling ----------------------------------------------------------------------
def _chunk_sampler(sizes, batch_size=8, chunk_size=4, seed=0, drop_last=False):
    parts = [list(range(size)) for size in sizes]
    samplers = [BatchSampler(SequentialSampler(part), batch_size, drop_last) for part in parts]
    return UniformChunkBatchSampler(ConcatDataset(parts), samplers, seed=seed, chunk_size=chunk_size, names="abc")


def test_batches_are_single_dataset_chunks_with_the_datasets_drawn_uniformly():
    sizes = [400, 40, 12]  # very different sizes, drawn equally often
    sampler = _chunk_sampler(sizes)
    offsets = [0, 400, 440]
    owner = lambda row: max(index for index, offset in enumerate(offsets) if row >= offset)  # noqa: E731
    batches = list(sampler)
    assert len(batches) == len(sampler) == 57 and all(len(batch) == 8 for batch in batches)
    chunks = [batch[start : start + 4] for batch in batches for start in (0, 4)]
    per_dataset = Counter()
    for chunk in chunks:
        assert len({owner(row) for row in chunk}) == 1  # one dataset per chunk
        assert len(set(chunk)) == 4  # no row twice in a chunk
        per_dataset[owner(chunk[0])] += 1
    assert min(per_dataset.values()) > 0.7 * len(chunks) / 3  # uniform over datasets, not proportional to size
    rows_of_smallest = [row for chunk in chunks if owner(chunk[0]) == 2 for row in chunk]
    assert len(rows_of_smallest) > 12 and set(rows_of_smallest) <= set(range(440, 452))  # revisited, in range
    assert list(_chunk_sampler(sizes)) == batches  # the same seed gives the same batches (every process agrees)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert len(_chunk_sampler(sizes, drop_last=True)) == 56


def test_a_dataset_smaller_than_a_chunk_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"smaller than one chunk of 4 rows: c \(3 rows\)"):
        _chunk_sampler([10, 8, 3])


def test_dataset_caps_and_hard_negatives_off(tmp_path):
    rows = [
        {
            "qry": f"q{i}",
            "qry_image_path": "",
            "pos_text": f"p{i}",
            "pos_image_path": "",
            "neg_text": f"n{i}",
            "neg_image_path": "",
            "dataset": "big" if i < 10 else "small",
        }
        for i in range(13)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept = load_mmeb_train(tmp_path / "train.jsonl")
    dropped = load_mmeb_train(tmp_path / "train.jsonl", hard_negatives=False)
    assert "negative_text" in kept.column_names and "negative_text" not in dropped.column_names

    assert parse_dataset_caps("5") == 5 and parse_dataset_caps(None) is None
    assert parse_dataset_caps("big=4, small=2") == {"big": 4, "small": 2}
    for bad in ("big=", "big=0", "x=y", "-3"):
        with pytest.raises(ValueError, match="Dataset cap"):
            parse_dataset_caps(bad)
    by_dataset = split_by_dataset(dropped)
    capped = cap_per_dataset(by_dataset, {"big": 4, "absent": 1})
    assert (len(capped["big"]), len(capped["small"])) == (4, 3)
    assert set(capped["big"]["anchor_text"]) <= {f"q{i}" for i in range(10)}
    assert cap_per_dataset(by_dataset, {"big": 4})["big"]["anchor_text"] == capped["big"]["anchor_text"]  # seeded
    assert {name: len(part) for name, part in cap_per_dataset(by_dataset, 2).items()} == {"big": 2, "small": 2}


def test_pooling_as_switches_and_restores():
    model, _ = _fresh_model()
    assert model.config.pooling == "mean"
    with pooling_as(model.config, "last"):
        assert model.config.pooling == "last"
    with pooling_as(model.config, None):
        assert model.config.pooling == "mean"
    assert model.config.pooling == "mean"
