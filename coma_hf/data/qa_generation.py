"""Stage-1 data for real images, made as the CoMa release made it, with any instruction-tuned VLM in transformers (the
*teacher*; the paper used Qwen2.5-VL-7B-Instruct).

Three tasks (`TASKS`), each written in the stage-1 schema (`id`, `image`, `text`, `conversation` of
`{question, answer, type}`, where `type` names the task):

* `qa`, the paper's data, in two steps. **Questions:** one reply per image lists 3–5 retrieval-oriented questions as a
  numbered list (`QUESTION_PROMPT`: objects and attributes; scene, time and weather; visible text and logos; spatial
  relations), read by `parse_question_list`, which keeps at most five. **Answers:** the teacher answers them as one
  multi-turn chat about the image, a question per turn (the image in the first), batched across images. An image
  whose reply yields fewer than 3 questions is asked once more when sampling (greedy decoding would repeat the same
  reply); if it is still short it is skipped — not written, so a rerun tries it again —, counted
  (`too_few_questions`) and logged by id.
* `caption`: one short one-sentence caption per image, as the release's caption script makes (the weak arm of the
  paper's description ablation).
* `describe`: one detailed description per image (our prompts).

For `caption` and `describe` the stored question is the prompt the teacher answered, drawn per image from the task's
`SINGLE_TURN_PROMPTS` (seeded by the image id): the answer was written for that prompt — its length and detail follow
it —, so the student learns a true pair, and varied wording (the release varies its caption prompts too) keeps it from
keying on one string.

Sampling (`Sampling`): temperature 0.7 by default, the release's, over the whole vocabulary — `top_k` 0 and `top_p` 1
are passed explicitly, because a checkpoint's `generation_config` may carry near-greedy values (Qwen's VL releases
ship top_k 1, top_p 0.001) that would make a bare temperature moot; temperature 0 decodes greedily. Each batch is
seeded from `seed` and its image ids, so a run is reproducible. Generation lengths are ceilings
(`DEFAULT_MAX_QUESTION_TOKENS`, `DEFAULT_MAX_ANSWER_TOKENS`) well above real replies (the release allowed 4,096 tokens
for questions and answers, 2,048 for captions; lower ceilings here because one reply that runs away holds its whole
batch until its ceiling); a reply that stops at its ceiling
without an end-of-sequence token is kept and counted (`question_lists_at_limit`, `answers_at_limit`).

Batched across images, with a progress bar showing throughput; records are appended to a JSONL file as each batch
finishes, and images whose id is already in the file are skipped, so an interrupted run resumes where it stopped (a
last line the interruption cut, and any line that damaged storage garbled, is dropped first with a warning, so its
image is redone and no record merges into a fragment). The run's counts
(`GenerationCounts`) come back and end the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from transformers.utils.logging import tqdm

from ..inputs import CoMaInputError, fit_aspect_ratio, load_image
from ..storage import write_atomically
from .sources import image_files, image_root_of, read_jsonl_lines, resolve_image_path

logger = logging.getLogger(__name__)

TASKS = ("qa", "caption", "describe")
MIN_QUESTIONS, MAX_QUESTIONS = 3, 5  # the paper's range of questions per image
DEFAULT_TEMPERATURE = 0.7  # the release's, for questions, answers and captions alike
DEFAULT_MAX_QUESTION_TOKENS = 512  # a list of five questions takes about 100 tokens
DEFAULT_MAX_ANSWER_TOKENS = 1024  # answers run to a few sentences; detailed descriptions to a few hundred tokens

QUESTION_PROMPT = (
    "Write 3 to 5 short questions about this image that together capture what someone would need to know to find "
    "this exact image again in a large collection. Where the image shows them, cover: the main objects and their "
    "attributes (kind, colour, number, position); the scene (the kind of place, and the time of day or the weather "
    "if visible); any visible text, numbers or logos; and where things are relative to each other. Every question "
    "must be answerable from the image alone and not a matter of opinion. Reply with a numbered list, one question "
    "per line, and nothing else."
)
SINGLE_TURN_PROMPTS = {
    "caption": (
        "Write a one-sentence caption for this image.",
        "Describe this image in one short sentence.",
        "In one sentence, what does this image show?",
        "Give a brief caption for this image.",
    ),
    "describe": (
        "Describe this image in detail.",
        "Give a detailed description of everything visible in this image.",
        "Describe this image thoroughly: the main objects and their attributes, the setting, any visible text, and "
        "how things are arranged.",
    ),
}

# A list item: an optional bullet, optional bold, an optional "Question"/"Q", then the number ("1." "1)" "(1)" "1:").
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s*)?(?:\*\*)?(?:(?:question|q)\s*)?\(?\d{1,2}\s*[.):]\s*(?P<text>.*)$", re.I)
_BULLETED = re.compile(r"^\s*[-*•]\s+(?P<text>.*)$")
_LABEL = re.compile(r"^\*\*[^*]{1,60}\*\*:?\s*")  # "**Objects:** What …" → "What …"


# --------------------------------------------------------------------------------------------------------------------
# Images in, resume
# --------------------------------------------------------------------------------------------------------------------
def iter_images(source: str | os.PathLike, image_root: str | None = None) -> Iterator[tuple[str, str]]:
    """`(id, path)` of every image in a folder (recursively; id = relative path) or a JSONL with `image` fields (as
    `examples/select_images.py` writes; relative paths start at `image_root`, else at the file's folder); a line that
    is not JSON stops with an error naming it."""
    source = Path(source)
    if source.is_dir():
        for relative in image_files(source):
            yield relative, str(source / relative)
        return
    root = image_root_of(source, image_root)
    for line_number, row, error in read_jsonl_lines(source):
        if error is not None:
            raise CoMaInputError(error, field="line")
        if "image" not in row:
            raise CoMaInputError("no 'image' field", f"line {line_number}", "image")
        yield str(row.get("id", row["image"])), resolve_image_path(row["image"], root)


def finished_ids(output_path: str | os.PathLike) -> set[str]:
    """Ids already written to `output_path` (a resumed run skips them)."""
    path = Path(output_path)
    if not path.exists():
        return set()
    # a line cut by an interruption is not JSON, so not done: that image is redone
    return {str(record["id"]) for _, record, error in read_jsonl_lines(path) if error is None and "id" in record}


def _record_id(line: str | bytes) -> str | None:
    """The id of a complete record line, or None for a blank or cut one."""
    try:
        return str(json.loads(line)["id"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def repair_damaged_lines(output_path: str | os.PathLike) -> None:
    """Leave only whole records in `output_path`, each on its own line, so a resumed run redoes exactly the images
    whose record was lost and its first record does not merge into a fragment.

    A kill mid-write cuts the last line; storage (a full disk, an interrupted copy, a bad sector) can garble any line.
    A record that only lost its final newline gets it back (it is done); every other line that is not a record (not
    UTF-8 JSON, not an object with an id) is dropped with a warning naming it, and its image is redone. The file is
    rewritten (atomically) only when a line must go; a whole file is only read.
    """
    path = Path(output_path)
    if not path.exists():
        return
    damaged, ends_whole = _damaged_lines(path)
    for number, what in damaged:
        logger.warning("Dropping line %d of %s (%s); its image is redone", number, path, what)
    if damaged:
        write_atomically(path, lambda temporary: _copy_records(path, temporary))
    elif not ends_whole:
        with path.open("ab") as handle:
            handle.write(b"\n")


def _damaged_lines(path: Path) -> tuple[list[tuple[int, str]], bool]:
    """`([(line number, what is wrong)], whether the file ends with a newline)`; blank lines are not damage."""
    damaged, last = [], b"\n"
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            last = raw
            if raw.strip() and _record_id(raw) is None:
                cut = not raw.endswith(b"\n")
                damaged.append((number, "cut short" if cut else "not a JSON record"))
    return damaged, last.endswith(b"\n")


def _copy_records(source: Path, target: Path) -> None:
    """Copy the record lines of `source` to `target`, each ending with a newline."""
    with source.open("rb") as lines, target.open("wb") as copy:
        for raw in lines:
            if _record_id(raw) is not None:
                copy.write(raw if raw.endswith(b"\n") else raw + b"\n")


# --------------------------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How the teacher decodes. `temperature` 0 is greedy; otherwise sampling with the given `top_p` / `top_k`
    (1 and 0: the whole vocabulary), which override whatever the checkpoint's `generation_config` says."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments `generate` takes for this decoding."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


class Reply(NamedTuple):
    """One generated reply: its text, its length in tokens (up to and including the end-of-sequence token) and
    whether it stopped at `max_new_tokens` without one."""

    text: str
    tokens: int
    at_limit: bool


def reply_length(tokens: Sequence[int], eos_token_ids: Iterable[int], max_new_tokens: int) -> tuple[int, bool]:
    """`(length, at_limit)` of one row of generated tokens (`[new_tokens]`, padded after an end-of-sequence token):
    the tokens up to and including the first end-of-sequence token, and whether there is none and the row reached
    `max_new_tokens`."""
    eos = set(eos_token_ids)
    for position, token in enumerate(tokens):
        if token in eos:
            return position + 1, False
    return len(tokens), len(tokens) >= max_new_tokens


class ChatModel(Protocol):
    """What the data makers need of a teacher: a batch of chats in, one reply each out (tests pass scripted ones)."""

    sampling: Sampling

    def reply(self, chats: list[list[dict]], max_new_tokens: int) -> list[Reply]: ...


class Teacher:
    """An instruction-tuned VLM with its processor, replying to a batch of chats (transformers chat messages whose
    `content` holds `{"type": "image", "image": PIL}` and `{"type": "text", "text": str}` parts) at once."""

    def __init__(self, model, processor, sampling: Sampling | None = None):
        self.model, self.processor, self.sampling = model, processor, sampling or Sampling()
        processor.tokenizer.padding_side = "left"  # generation continues from the right end
        eos = model.generation_config.eos_token_id
        eos = processor.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)

    @torch.no_grad()
    def reply(self, chats: list[list[dict]], max_new_tokens: int) -> list[Reply]:
        """One assistant turn for each chat, decoded as `self.sampling` says."""
        inputs = self.processor.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **self.sampling.generate_kwargs())
        replies = []
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            length, at_limit = reply_length(row, self.eos_token_ids, max_new_tokens)
            text = self.processor.decode(row[:length], skip_special_tokens=True).strip()
            replies.append(Reply(text, length, at_limit))
        return replies


def _user(text: str, image: Any = None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# --------------------------------------------------------------------------------------------------------------------
# What a run counts
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class GenerationCounts:
    """What one `generate_qa` run did: images written, skipped as already done, unreadable, or with fewer than 3
    questions after a retry; replies generated and how many stopped at their token limit; generated tokens and the
    run's wall time (for throughput)."""

    written: int = 0
    skipped_done: int = 0
    skipped_unreadable: int = 0
    too_few_questions: int = 0
    question_lists: int = 0
    question_lists_at_limit: int = 0
    answers: int = 0
    answers_at_limit: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def add(self, replies: list[Reply], kind: str) -> None:
        """Count `replies` as `"questions"` (lists of questions) or `"answers"` (answers, captions, descriptions)."""
        if kind not in ("questions", "answers"):
            raise ValueError(f"kind must be 'questions' or 'answers', got {kind!r}")
        prefix = "question_lists" if kind == "questions" else "answers"
        setattr(self, prefix, getattr(self, prefix) + len(replies))
        setattr(self, f"{prefix}_at_limit", getattr(self, f"{prefix}_at_limit") + sum(r.at_limit for r in replies))
        self.generated_tokens += sum(reply.tokens for reply in replies)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what was written and skipped, replies at their limit, throughput."""
        return (
            f"{self.written} images written ({self.skipped_done} already done, {self.skipped_unreadable} unreadable, "
            f"{self.too_few_questions} with fewer than {MIN_QUESTIONS} questions: skipped); "
            f"{self.answers_at_limit} of {self.answers} answers and {self.question_lists_at_limit} of "
            f"{self.question_lists} question lists stopped at their token limit; "
            f"{self.images_per_second:.2f} images/s, {self.tokens_per_second:.1f} generated tokens/s"
        )


# --------------------------------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------------------------------
def parse_question_list(reply: str) -> list[str]:
    """The questions of a numbered list, at most `MAX_QUESTIONS`, in order and without repeats.

    Items are lines numbered `1.`, `1)`, `(1)`, `1:` or `Question 1:` (bold allowed) or bulleted `-`, `*`, `•`;
    other lines (a preamble such as "Here are some questions:", a closing note) are dropped, as are items that end
    in a colon (section headings). A reply without any numbered or bulleted line is read as one question per line,
    keeping the lines that end in a question mark. May return fewer than `MIN_QUESTIONS`: the caller decides.
    """
    lines = [line for line in reply.splitlines() if line.strip()]
    items = [match["text"] for line in lines if (match := _NUMBERED.match(line) or _BULLETED.match(line))]
    if not items:
        items = [line for line in lines if line.strip().endswith("?")]
    questions, seen = [], set()
    for item in items:
        question = _LABEL.sub("", item.strip()).strip().strip("*").strip().strip("\"'“”").strip()
        if question and not question.endswith(":") and question.lower() not in seen:
            seen.add(question.lower())
            questions.append(question)
    return questions[:MAX_QUESTIONS]


def ask_questions(
    teacher: ChatModel, images: list, max_new_tokens: int, counts: GenerationCounts, attempts: int = 2
) -> list[list[str]]:
    """3–5 questions for each image (step 1), from one reply each; an image whose reply yields fewer is asked again,
    up to `attempts` replies in all, and gets an empty list if every one fell short."""
    questions: list[list[str]] = [[] for _ in images]
    pending = list(range(len(images)))
    for _ in range(attempts):
        if not pending:
            break
        replies = teacher.reply([[_user(QUESTION_PROMPT, images[index])] for index in pending], max_new_tokens)
        counts.add(replies, "questions")
        for index, reply in zip(pending, replies, strict=True):
            questions[index] = parse_question_list(reply.text)
        pending = [index for index in pending if len(questions[index]) < MIN_QUESTIONS]
    for index in pending:
        questions[index] = []
    return questions


def answer_in_turns(
    teacher: ChatModel, images: list, questions: list[list[str]], max_new_tokens: int, counts: GenerationCounts
) -> list[list[dict]]:
    """Each image's questions answered as one multi-turn chat (step 2): turn t asks question t of every image that
    has one, in one batch; the image goes with the first question. Returns the `{question, answer, type}` turns."""
    chats: list[list[dict]] = [[] for _ in images]
    conversations: list[list[dict]] = [[] for _ in images]
    for turn in range(max((len(asked) for asked in questions), default=0)):
        active = [index for index, asked in enumerate(questions) if len(asked) > turn]
        for index in active:
            chats[index].append(_user(questions[index][turn], images[index] if turn == 0 else None))
        replies = teacher.reply([chats[index] for index in active], max_new_tokens)
        counts.add(replies, "answers")
        for index, reply in zip(active, replies, strict=True):
            chats[index].append(_assistant(reply.text))
            conversations[index].append({"question": questions[index][turn], "answer": reply.text, "type": "qa"})
    return conversations


def task_prompt(task: str, image_id: str, seed: int = 0) -> str:
    """The prompt an image gets for a single-turn task (`caption`, `describe`): one of `SINGLE_TURN_PROMPTS[task]`,
    drawn by `seed` and the image id (so a resumed or rebatched run asks the same)."""
    if task not in SINGLE_TURN_PROMPTS:
        raise ValueError(f"{task!r} is not a single-turn task; those are {sorted(SINGLE_TURN_PROMPTS)}")
    return random.Random(f"{seed}:{image_id}").choice(SINGLE_TURN_PROMPTS[task])


def single_turn(
    teacher: ChatModel,
    task: str,
    images: list,
    image_ids: list[str],
    max_new_tokens: int,
    counts: GenerationCounts,
    seed: int = 0,
) -> list[list[dict]]:
    """One caption or description per image, as a one-turn conversation whose question is the prompt asked."""
    prompts = [task_prompt(task, image_id, seed) for image_id in image_ids]
    replies = teacher.reply(
        [[_user(prompt, image)] for prompt, image in zip(prompts, images, strict=True)], max_new_tokens
    )
    counts.add(replies, "answers")
    return [
        [{"question": prompt, "answer": reply.text, "type": task}]
        for prompt, reply in zip(prompts, replies, strict=True)
    ]


def batch_seed(seed: int, image_ids: Sequence[str]) -> int:
    """The torch seed of one batch: from the run's seed and the batch's image ids, so that a batch of the same
    images samples the same replies whatever ran before it."""
    digest = hashlib.sha256("\n".join([str(seed), *image_ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
# Kept long: 25 lines of docstring; the loop is one pass over batches with its resume and counts.
def generate_qa(
    teacher: ChatModel,
    images: Iterable[tuple[str, Any]],
    output_path: str | os.PathLike,
    task: str = "qa",
    batch_size: int = 8,
    max_question_tokens: int = DEFAULT_MAX_QUESTION_TOKENS,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    seed: int = 0,
    image_root: str | os.PathLike | None = None,
    total: int | None = None,
) -> GenerationCounts:
    """Write stage-1 records (`id`, `image`, `text`, `conversation`) of `task` for `images` (`(id, image path)`
    pairs, as `iter_images` gives) to `output_path`, skipping ids already there.

    `teacher`: a `Teacher` (or anything with its `reply` and `sampling`). Stored image paths are relative to
    `image_root`, by default the output file's folder, where the stage-1 reader starts relative paths; an image that
    is not a path (a record must say where its image is) is an error naming it. Unreadable images are skipped,
    counted and logged; so are, for `qa`, images left with fewer than 3 questions after one retry (none when decoding
    greedily). Returns the run's `GenerationCounts`, whose summary is also logged.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    repair_damaged_lines(output_path)
    done = finished_ids(output_path)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    store_root = str(image_root) if image_root is not None else str(output_path.parent)
    counts = GenerationCounts()
    start = time.perf_counter()
    with (
        output_path.open("a", encoding="utf-8") as handle,
        tqdm(total=total, desc=f"Generating {task}", unit="image") as bar,
    ):

        def write(batch: list[tuple[str, Any, Any]]) -> None:
            """Generate for one batch, append its records, show the throughput so far."""
            conversations = _conversations(teacher, task, batch, seed, max_question_tokens, max_answer_tokens, counts)
            for (image_id, image, _), conversation in zip(batch, conversations, strict=True):
                if not conversation:
                    logger.warning("Skipping %s: fewer than %d questions in every reply", image_id, MIN_QUESTIONS)
                    counts.too_few_questions += 1
                    continue
                record = {"id": image_id, "image": _stored_path(image, store_root), "text": None}
                handle.write(json.dumps({**record, "conversation": conversation}) + "\n")
                counts.written += 1
            handle.flush()
            counts.seconds = time.perf_counter() - start
            bar.set_postfix(images_s=f"{counts.images_per_second:.2f}", tokens_s=f"{counts.tokens_per_second:.1f}")
            bar.update(len(batch))

        batch: list[tuple[str, Any, Any]] = []
        for image_id, image in images:
            if str(image_id) in done:
                counts.skipped_done += 1
                bar.update(1)
                continue
            if not isinstance(image, (str, os.PathLike)):
                raise CoMaInputError(f"expected an image path, got {type(image).__name__}", image_id, "image")
            try:
                batch.append((str(image_id), image, fit_aspect_ratio(load_image(image, sample=image_id))))
            except CoMaInputError as error:
                logger.warning("Skipping unreadable image: %s", error)
                counts.skipped_unreadable += 1
                bar.update(1)
                continue
            if len(batch) == batch_size:
                write(batch)
                batch = []
        if batch:
            write(batch)
    counts.seconds = time.perf_counter() - start
    logger.info("%s -> %s", counts.summary(), output_path)
    return counts


def _conversations(
    teacher: ChatModel,
    task: str,
    batch: list[tuple[str, Any, Any]],
    seed: int,
    max_question_tokens: int,
    max_answer_tokens: int,
    counts: GenerationCounts,
) -> list[list[dict]]:
    """The conversation of each image in `batch` (`(id, source, PIL image)`); empty for a `qa` image without
    enough questions."""
    image_ids = [image_id for image_id, _, _ in batch]
    pictures = [picture for _, _, picture in batch]
    torch.manual_seed(batch_seed(seed, image_ids))
    if task != "qa":
        return single_turn(teacher, task, pictures, image_ids, max_answer_tokens, counts, seed)
    attempts = 1 if teacher.sampling.greedy else 2  # a greedy retry would repeat the same reply
    questions = ask_questions(teacher, pictures, max_question_tokens, counts, attempts)
    return answer_in_turns(teacher, pictures, questions, max_answer_tokens, counts)


def _stored_path(image: str | os.PathLike, root: str) -> str:
    """`image`'s path relative to `root` (where the stage-1 reader will start it), with forward slashes."""
    return Path(os.path.relpath(image, root)).as_posix()
