"""Stage-1 data generation: the question-list parser, the two QA steps and the single-turn tasks with a scripted
teacher (a tiny random VLM writes gibberish, never a numbered list), and the real batching, sampling, limit counting
and resume path with the tiny random backbone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from coma_hf.data.qa_generation import (
    MAX_QUESTIONS,
    QUESTION_PROMPT,
    SINGLE_TURN_PROMPTS,
    GenerationCounts,
    Reply,
    Sampling,
    Teacher,
    answer_in_turns,
    ask_questions,
    batch_seed,
    finished_ids,
    generate_qa,
    iter_images,
    parse_question_list,
    repair_damaged_lines,
    reply_length,
    task_prompt,
)
from coma_hf.data.stage1 import load_stage1_dataset, normalize_stage1_record
from coma_hf.inputs import CoMaInputError
from coma_hf.tiny import build_tiny_backbone

from utils import load_example, random_image


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without its video half (which needs torchvision, absent here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


@pytest.fixture(scope="module")
def vlm():
    backbone, parts = build_tiny_backbone(seed=1)
    return backbone.eval(), ImageOnlyQwenProcessor(
        parts.image_processor, parts.tokenizer, chat_template=parts.chat_template
    )


def _write_images(folder, count, start=0):
    """`count` noise images `img_{i}.png`, image i `40 + i` pixels wide (the scripted teacher tells them apart)."""
    folder.mkdir(exist_ok=True)
    for index in range(start, start + count):
        random_image(index, (40 + index, 56)).save(folder / f"img_{index}.png")


class ScriptedTeacher:
    """A teacher whose reply to each chat is `script(image_width, chat)` (text, or `(text, at_limit)`); it records
    every batch as the text of each chat's last turn and where the chat's images are."""

    def __init__(self, script, sampling: Sampling | None = None):
        self.script, self.sampling, self.batches = script, sampling or Sampling(), []

    def reply(self, chats, max_new_tokens):
        self.batches.append([_shape(chat) for chat in chats])
        replies = []
        for chat in chats:
            width = chat[0]["content"][0]["image"].size[0]
            scripted = self.script(width, chat)
            text, at_limit = scripted if isinstance(scripted, tuple) else (scripted, False)
            replies.append(Reply(text, len(text.split()), at_limit))
        return replies


def _shape(chat: list[dict]) -> dict:
    """A snapshot of a chat: its roles, which messages hold an image, and the text of its last message."""
    return {
        "roles": [message["role"] for message in chat],
        "images_in": [i for i, message in enumerate(chat) if any(p["type"] == "image" for p in message["content"])],
        "last": chat[-1]["content"][-1]["text"],
    }


def _numbered(width: int, count: int) -> str:
    return "Here are some questions:\n" + "\n".join(f"{n}. Q{n} of {width}?" for n in range(1, count + 1))


def _qa_script(question_counts: dict[int, int]):
    """Image of width w lists `question_counts[w]` questions; an answer repeats its question."""

    def script(width, chat):
        last = chat[-1]["content"][-1]["text"]
        return _numbered(width, question_counts[width]) if last == QUESTION_PROMPT else f"answer to {last}"

    return script


# --------------------------------------------------------------------------------------------------------------------
# Parsing the question list
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "questions"),
    [
        ("1. What is red?\n2. Where is it?\n3. Who is there?", ["What is red?", "Where is it?", "Who is there?"]),
        (  # parentheses, a preamble and a closing note
            "Sure! Here are questions for retrieval:\n\n1) What is red?\n2) Where is it?\n3) Who is there?\n"
            "These questions cover the main content.",
            ["What is red?", "Where is it?", "Who is there?"],
        ),
        ("- What is red?\n* Where is it?\n• Who is there?", ["What is red?", "Where is it?", "Who is there?"]),
        (  # bold numbers, "Question n:", "(n)", a bold label, quotes
            '**1.** What is red?\nQuestion 2: Where is it?\n(3) **Text:** "What does the sign say?"',
            ["What is red?", "Where is it?", "What does the sign say?"],
        ),
        (  # section headings (ending in a colon) with their questions bulleted under them
            "1. Objects:\n   - What is red?\n2. Scene:\n   - Where is it?\n   - When was it taken?",
            ["What is red?", "Where is it?", "When was it taken?"],
        ),
        (  # no markers at all: one question per line, other lines dropped
            "What is red?\nWhere is it?\nI hope these help.\nWho is there?",
            ["What is red?", "Where is it?", "Who is there?"],
        ),
        ("1. What is red?\n2. what is red?\n3. Where is it?", ["What is red?", "Where is it?"]),  # repeats
        ("The image shows a red car.", []),
    ],
)
def test_a_numbered_list_is_parsed_into_its_questions(reply, questions):
    assert parse_question_list(reply) == questions


def test_a_long_list_keeps_its_first_five():
    assert parse_question_list(_numbered(7, 8)) == [f"Q{n} of 7?" for n in range(1, MAX_QUESTIONS + 1)]


# --------------------------------------------------------------------------------------------------------------------
# The two QA steps and the single-turn tasks, scripted
# --------------------------------------------------------------------------------------------------------------------
def test_questions_are_answered_as_one_multi_turn_chat_batched_across_images():
    images = [random_image(0, (40, 40)), random_image(1, (41, 40))]
    teacher, counts = ScriptedTeacher(_qa_script({40: 3, 41: 5})), GenerationCounts()

    questions = ask_questions(teacher, images, 512, counts)
    assert questions == [[f"Q{n} of 40?" for n in (1, 2, 3)], [f"Q{n} of 41?" for n in range(1, 6)]]
    conversations = answer_in_turns(teacher, images, questions, 1024, counts)

    assert conversations[1] == [
        {"question": f"Q{n} of 41?", "answer": f"answer to Q{n} of 41?", "type": "qa"} for n in range(1, 6)
    ]
    answering = teacher.batches[1:]
    assert [len(batch) for batch in answering] == [2, 2, 2, 1, 1]  # turn by turn; the 3-question image stops
    last_turn = answering[-1][0]  # image 2's fifth turn carries its four earlier turns, the image in the first only
    assert last_turn["roles"] == ["user", "assistant"] * 4 + ["user"] and last_turn["images_in"] == [0]
    assert last_turn["last"] == "Q5 of 41?"
    assert (counts.question_lists, counts.answers) == (2, 8)


def test_an_image_with_too_few_questions_is_asked_once_more_then_skipped_and_counted(tmp_path):
    _write_images(tmp_path / "images", 3)  # widths 40, 41, 42
    replies = {40: iter([_numbered(40, 2), _numbered(40, 4)]), 41: iter([_numbered(41, 3)])}

    def script(width, chat):
        if chat[-1]["content"][-1]["text"] != QUESTION_PROMPT:
            return "an answer"
        return next(replies[width]) if width in replies else "I cannot see any detail worth asking about."

    output = tmp_path / "qa.jsonl"
    counts = generate_qa(ScriptedTeacher(script), iter_images(tmp_path / "images"), output, batch_size=3)
    assert (counts.written, counts.too_few_questions, counts.question_lists) == (2, 1, 5)  # 3 lists + 2 retries
    written = {row["id"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert sorted(written) == ["img_0.png", "img_1.png"]  # img_2 is not written: a rerun tries it again
    assert [turn["question"] for turn in written["img_0.png"]["conversation"]] == [
        f"Q{n} of 40?" for n in (1, 2, 3, 4)
    ]

    greedy = ScriptedTeacher(lambda width, chat: _numbered(width, 2), Sampling(temperature=0))
    counts = generate_qa(greedy, iter_images(tmp_path / "images"), tmp_path / "greedy.jsonl", batch_size=3)
    assert (counts.too_few_questions, counts.question_lists) == (3, 3)  # greedy: no retry, it would say the same


def test_replies_at_their_limit_are_counted_and_reported(tmp_path, caplog):
    _write_images(tmp_path / "images", 2)

    def script(width, chat):
        if chat[-1]["content"][-1]["text"] == QUESTION_PROMPT:
            return _numbered(width, 3), width == 41  # img_1's list was cut, though it parses
        return "a long answer", chat[-1]["content"][-1]["text"].startswith("Q2")

    with caplog.at_level("INFO", logger="coma_hf.data.qa_generation"):
        counts = generate_qa(ScriptedTeacher(script), iter_images(tmp_path / "images"), tmp_path / "qa.jsonl")
    assert (counts.question_lists_at_limit, counts.question_lists) == (1, 2)
    assert (counts.answers_at_limit, counts.answers, counts.written) == (2, 6, 2)
    assert "2 of 6 answers and 1 of 2 question lists stopped at their token limit" in caplog.text
    assert counts.generated_tokens > 0 and counts.images_per_second > 0 and "generated tokens/s" in caplog.text


@pytest.mark.parametrize("task", ["caption", "describe"])
def test_single_turn_tasks_write_stage1_records_the_stage1_reader_reads(task, tmp_path):
    _write_images(tmp_path / "images", 3)
    output = tmp_path / "data" / f"{task}.jsonl"
    teacher = ScriptedTeacher(lambda width, chat: f"A picture {width} pixels wide.")
    counts = generate_qa(teacher, iter_images(tmp_path / "images"), output, task=task, batch_size=2, seed=3)
    assert (counts.written, counts.answers, counts.question_lists) == (3, 3, 0)
    assert [len(batch) for batch in teacher.batches] == [2, 1]

    dataset, root = load_stage1_dataset(output)  # relative image paths start at the output's folder
    for index, row in enumerate(dataset):
        record = normalize_stage1_record(row, index, root)
        assert open(record["image"], "rb").read(4) == b"\x89PNG"  # the path leads to the image
        (turn,) = record["conversation"]
        assert turn["type"] == task and turn["question"] in SINGLE_TURN_PROMPTS[task]
        assert turn["question"] == task_prompt(task, record["id"], seed=3)  # the prompt the teacher was asked
        assert turn["answer"] == f"A picture {40 + index} pixels wide."


def test_the_prompt_of_an_image_depends_on_its_id_and_the_seed_only():
    ids = [f"img_{index}.png" for index in range(40)]
    prompts = [task_prompt("caption", image_id, seed=0) for image_id in ids]
    assert prompts == [task_prompt("caption", image_id, seed=0) for image_id in ids]
    assert set(prompts) == set(SINGLE_TURN_PROMPTS["caption"])  # all wordings are used
    assert prompts != [task_prompt("caption", image_id, seed=1) for image_id in ids]
    with pytest.raises(ValueError, match="single-turn"):
        task_prompt("qa", "img_0.png")


def test_bad_settings_and_inputs_are_refused(tmp_path):
    teacher = ScriptedTeacher(lambda width, chat: "")
    with pytest.raises(ValueError, match="task must be one of"):
        generate_qa(teacher, [], tmp_path / "x.jsonl", task="poem")
    with pytest.raises(CoMaInputError, match="sample a, field 'image'"):
        generate_qa(teacher, [("a", random_image(0))], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([5, 6, 9, 0, 0], (3, False)),  # ended (9), then padded
        ([5, 6, 7, 8], (4, True)),  # no end-of-sequence token and as long as allowed
        ([5, 6], (2, False)),  # shorter than allowed: stopped by something else
        ([5, 6, 7, 9], (4, False)),  # ended on the last allowed token: complete
    ],
)
def test_a_reply_is_at_its_limit_only_without_an_end_of_sequence_token(tokens, expected):
    assert reply_length(tokens, {9, 10}, max_new_tokens=4) == expected


# --------------------------------------------------------------------------------------------------------------------
# The real path, with the tiny random backbone
# --------------------------------------------------------------------------------------------------------------------
def test_the_sampling_settings_reach_generate(vlm, monkeypatch):
    model, processor = vlm
    calls = []
    generate = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": random_image(0)}, {"type": "text", "text": "Hi"}]}]
    ]
    Teacher(model, processor).reply(chats, max_new_tokens=2)
    Teacher(model, processor, Sampling(temperature=0)).reply(chats, max_new_tokens=2)
    sampled, greedy = calls
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (True, 0.7, 0, 1.0)
    assert sampled["max_new_tokens"] == 2
    assert greedy["do_sample"] is False and "temperature" not in greedy


def test_replies_that_hit_max_new_tokens_without_ending_are_counted(vlm, tmp_path, monkeypatch):
    model, processor = vlm
    _write_images(tmp_path / "images", 3)
    eos = processor.tokenizer.eos_token_id
    teacher = Teacher(model, processor)

    monkeypatch.setattr(model.generation_config, "suppress_tokens", [eos])  # it cannot end: every reply is cut
    cut = generate_qa(
        teacher, iter_images(tmp_path / "images"), tmp_path / "cut.jsonl", "caption", max_answer_tokens=3
    )
    assert (cut.answers_at_limit, cut.answers, cut.generated_tokens) == (3, 3, 9)

    monkeypatch.setattr(model.generation_config, "suppress_tokens", None)
    monkeypatch.setattr(model.generation_config, "forced_eos_token_id", eos)  # it ends on its last allowed token
    ended = generate_qa(
        teacher, iter_images(tmp_path / "images"), tmp_path / "end.jsonl", "caption", max_answer_tokens=3
    )
    assert (ended.answers_at_limit, ended.answers) == (0, 3)


def test_qa_from_a_model_that_lists_no_questions_skips_and_counts_every_image(vlm, tmp_path):
    model, processor = vlm
    _write_images(tmp_path / "images", 2)
    output = tmp_path / "qa.jsonl"
    counts = generate_qa(
        Teacher(model, processor), iter_images(tmp_path / "images"), output, max_question_tokens=4, batch_size=2
    )
    assert (counts.written, counts.too_few_questions, counts.question_lists) == (0, 2, 4)  # each asked twice
    assert output.read_text() == ""


def _caption(vlm, images, output, batch_size: int, seed: int = 0) -> GenerationCounts:
    """One sampled `caption` run of the tiny backbone over the images in the folder `images` (4 new tokens)."""
    model, processor = vlm
    return generate_qa(
        Teacher(model, processor),
        iter_images(images),
        output,
        task="caption",
        batch_size=batch_size,
        max_answer_tokens=4,
        seed=seed,
    )


def test_generates_stage1_records_and_resumes(vlm, tmp_path):
    images = tmp_path / "images"
    _write_images(images, 3)
    (images / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "qa.jsonl"

    counts = _caption(vlm, images, output, batch_size=2)
    assert (counts.written, counts.skipped_done, counts.skipped_unreadable) == (3, 0, 1)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["img_0.png", "img_1.png", "img_2.png"]

    _write_images(images, 2, start=3)
    resumed = _caption(vlm, images, output, batch_size=2)
    assert (resumed.written, resumed.skipped_done, resumed.skipped_unreadable) == (2, 3, 1)
    assert len(finished_ids(output)) == 5
    assert len(output.read_text().splitlines()) == 5  # nothing written twice


def test_a_seeded_run_is_reproducible_and_resuming_it_changes_nothing(vlm, tmp_path):
    images = tmp_path / "images"
    _write_images(images, 3)
    whole, again, other = tmp_path / "whole.jsonl", tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    _caption(vlm, images, whole, batch_size=1)
    _caption(vlm, images, again, batch_size=1)
    _caption(vlm, images, other, batch_size=1, seed=1)
    assert whole.read_text() == again.read_text()
    assert whole.read_text() != other.read_text()  # sampled: another seed, other replies

    interrupted = tmp_path / "interrupted.jsonl"
    interrupted.write_text("".join(whole.read_text().splitlines(keepends=True)[:2]))
    _caption(vlm, images, interrupted, batch_size=1)
    assert interrupted.read_text() == whole.read_text()  # each batch seeded by its images: resuming changes nothing


def test_resume_after_a_cut_last_line_keeps_every_record_once(vlm, tmp_path):
    images = tmp_path / "images"
    _write_images(images, 3)
    output = tmp_path / "qa.jsonl"
    _caption(vlm, images, output, batch_size=1)
    complete = output.read_text().splitlines(keepends=True)
    output.write_text("".join(complete[:2]) + complete[2][: len(complete[2]) // 2])  # a kill mid-write

    resumed = _caption(vlm, images, output, batch_size=1)
    assert (resumed.written, resumed.skipped_done, resumed.skipped_unreadable) == (1, 2, 0)
    rows = [json.loads(line) for line in output.read_text().splitlines()]  # every line reads back
    assert sorted(row["id"] for row in rows) == ["img_0.png", "img_1.png", "img_2.png"]


def test_the_script_takes_the_papers_sampling_by_default():
    script = load_example("generate_qa")
    args = script.parse_args(["--model_name_or_path", "m", "--images", "i", "--output", "o"])
    assert (args.task, args.temperature, args.top_k, args.top_p) == ("qa", 0.7, 0, 1.0)
    assert args.max_answer_tokens >= 512 and args.max_question_tokens >= 256
    with pytest.raises(SystemExit):
        script.parse_args(["--model_name_or_path", "m", "--images", "i", "--output", "o", "--task", "poem"])


# --------------------------------------------------------------------------------------------------------------------
# Reading images in, resume bookkeeping
# --------------------------------------------------------------------------------------------------------------------
def test_a_cut_line_from_an_interruption_is_redone(tmp_path):
    output = tmp_path / "qa.jsonl"
    output.write_text(json.dumps({"id": "done", "conversation": []}) + "\n" + '{"id": "cut", "conv')
    assert finished_ids(output) == {"done"}


def test_images_listed_in_jsonl_resolve_against_its_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    random_image(0).save(tmp_path / "pics" / "a.png")
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"id": "first", "image": "pics/a.png"}) + "\n")
    assert list(iter_images(listing)) == [("first", str(tmp_path / "pics" / "a.png"))]


@pytest.mark.parametrize(
    ("written", "repaired"),
    [
        ('{"id": "a"}\n{"id": "b"}', '{"id": "a"}\n{"id": "b"}\n'),  # only the newline was lost: kept, done
        ('{"id": "a"}\n{"id": "b', '{"id": "a"}\n'),  # a fragment: cut, redone
        ('{"id": "b', ""),  # a fragment as the only line
        ('{"id": "a"}\n', '{"id": "a"}\n'),  # a clean file is left alone
    ],
)
def test_a_resumed_file_ends_on_a_complete_line(tmp_path, written, repaired):
    output = tmp_path / "qa.jsonl"
    output.write_text(written)
    repair_damaged_lines(output)
    assert output.read_text() == repaired


def test_a_batch_seed_depends_on_the_runs_seed_and_the_batchs_images():
    assert batch_seed(0, ["a", "b"]) == batch_seed(0, ["a", "b"]) != batch_seed(1, ["a", "b"])
    assert batch_seed(0, ["a", "b"]) != batch_seed(0, ["ab"])
    torch.manual_seed(batch_seed(0, ["a"]))  # a valid torch seed
