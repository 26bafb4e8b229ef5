"""How `CoMaProcessor` renders each kind of input into token ids (`CoMaRenderingMixin`): a stage-2 query or candidate
(`render_embedding_input`, and chat messages through `apply_chat_template`, the way sentence-transformers feeds
CoMa), a stage-1 sample with its QA turns (`render_qa_sample`), a stage-1 input alone for `compress`
(`render_compression_input`) and a question asked of a compression (`render_question`). The layouts and the one
truncation rule are `layout_coma`'s; the settings, the token cache, the image block and collation are the
processor's.

Part of the remote code shipped with every checkpoint: imports only torch, transformers, sibling files and the
standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature

from .constants_coma import IGNORE_INDEX, BatchKey
from .inputs import CoMaInputError, EmbeddingInput, message_input, without_image_placeholders
from .layout_coma import InputLayout, RenderedSample, blamed_field, fit_to_length, render_parts, render_prompt


class CoMaRenderingMixin:
    """The renderers of `CoMaProcessor`, which mixes this in; they read its settings (`max_length`, `loss_on`,
    `compress_instruction`, the layouts) and use its pieces (`_encode`, `_image_block`, `_special`, `collate`)."""

    def _turn(self, question: str, answer: str | None) -> tuple[list[int], list[bool]]:
        """`<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}<|im_end|>\\n` and a per-token answer
        flag."""
        special = self._special
        prompt = (
            [special["im_start"]]
            + self._encode("user\n")
            + self._encode(question)
            + [special["im_end"]]
            + self._encode("\n")
            + [special["im_start"]]
            + self._encode("assistant\n")
        )
        if answer is None:
            return prompt, [False] * len(prompt)
        reply = self._encode(answer) + [special["im_end"]]
        tail = self._encode("\n")
        return prompt + reply + tail, [False] * len(prompt) + [True] * len(reply) + [False] * len(tail)

    def _render_layout(
        self, layout: InputLayout, values: dict[str, Any], sample: Any, reserve: int = 0
    ) -> tuple[list[int], int]:
        """Token ids of `values` in `layout` and the text tokens cut so that they, and `reserve` tokens after them
        (stage 1's first QA turn), fit in `max_length` (`layout_coma.fit_to_length`)."""

        def fit(pieces: list[list[int]], text_pieces: Sequence[int]) -> tuple[list[int], int]:
            return fit_to_length(pieces, text_pieces, self.max_length, reserve, sample, blamed_field(values, reserve))

        render = render_prompt if layout.mode == "prompt" else render_parts
        return render(layout, values, self._encode, fit)

    # ---- stage 2 ----------------------------------------------------------------------------------------------------
    def render_embedding_input(
        self,
        text: str | None = None,
        image: Any = None,
        instruction: str | None = None,
        sample: Any = None,
        layout: str | None = None,
    ) -> RenderedSample:
        """Render one query or candidate in `embedding_layout` (by default `[image]{instruction}\\n{text}<cmp_0>…`)
        or in the named `layout` of the processor's config, or — in a parts-mode layout — when `text` carries an
        image placeholder, as the text with the image at the placeholder, then `<cmp_0>…`. A prompt-mode layout drops
        the placeholders from the instruction and the text (see `InputLayout`).
        """
        chosen = self.layout_named(layout, sample)
        text = text or ""
        if chosen.mode == "prompt":  # a prompt has no place for a placeholder: dropped, as the release's parsers do
            text = without_image_placeholders(text, self._placeholder)
            if instruction is not None:
                instruction = without_image_placeholders(instruction, self._placeholder)
        # without an image the placeholders are removed: a text of nothing else is empty
        if image is None and not self._placeholder.sub("", text).strip():
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        pixel_values = grid = None
        vision: list[int] = []
        if image is not None:
            vision, pixel_values, grid = self._image_block(image, sample)
        compression = self.compression_token_ids
        if chosen.mode == "prompt":  # instruction and text joined as given, as a stock processor's prompt
            values = chosen.slot_values(vision, instruction, text, compression)
            ids, cut = self._render_layout(chosen, values, sample)
            return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

        match = self._placeholder.search(text)
        if match and image is not None:  # MMEB rows carry their instruction and the image's place
            before, after = self._encode(text[: match.start()]), self._encode(text[match.end() :])
            ids, cut = fit_to_length([before, vision, after, compression], [0, 2], self.max_length, 0, sample, "image")
        else:
            text = self._placeholder.sub("", text) if match else text
            values = chosen.slot_values(vision, instruction, text, compression)
            ids, cut = self._render_layout(chosen, values, sample)
        return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

    # ---- stage 1 ----------------------------------------------------------------------------------------------------
    def render_qa_sample(
        self,
        image: Any = None,
        text: str | None = None,
        conversation: Sequence[dict] = (),
        sample: Any = None,
    ) -> RenderedSample:
        """Render one stage-1 sample; `conversation` is a list of `{"question": …, "answer": …}` turns (≥ 1).

        Labels cover the answers and their `<|im_end|>` (`self.loss_on == "answers"`), or every token after the
        compression tokens (`"all_after_compression"`).
        """
        if not (text or "").strip() and image is None:
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        turns = [self._checked_turn(turn, index, sample) for index, turn in enumerate(conversation or ())]
        if not turns:
            raise CoMaInputError("the conversation has no question/answer turn", sample, "conversation")

        prefix = self.render_compression_input(image, text, sample=sample, reserve=len(turns[0][0]))
        ids, answer_flags = list(prefix.input_ids), [False] * len(prefix.input_ids)
        kept = 0
        for turn_ids, flags in turns:
            if self.max_length is not None and len(ids) + len(turn_ids) > self.max_length:
                break
            ids += turn_ids
            answer_flags += flags
            kept += 1
        if self.loss_on == "answers":
            labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, answer_flags, strict=False)]
        else:
            labels = [IGNORE_INDEX] * len(prefix.input_ids) + ids[len(prefix.input_ids) :]
        prefix.input_ids, prefix.labels, prefix.dropped_turns = ids, labels, len(turns) - kept
        return prefix

    def render_compression_input(
        self, image: Any = None, text: str | None = None, sample: Any = None, reserve: int = 0
    ) -> RenderedSample:
        """The stage-1 input alone, in `compression_layout` (by default `[image]{text}\n{compress_instruction}<cmp…`):
        what `compress` takes to answer questions as in stage 1. `reserve` keeps that many tokens free after it (the
        first QA turn): the text is truncated for them, and if even the empty text leaves too little room it is an
        error."""
        text = self._placeholder.sub("", text or "").strip()
        if not text and image is None:
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        pixel_values = grid = None
        vision: list[int] = []
        if image is not None:
            vision, pixel_values, grid = self._image_block(image, sample)
        values = {
            "image": vision,
            "instruction": self.compress_instruction,
            "text": text,
            "compression": self.compression_token_ids,
        }
        ids, cut = self._render_layout(self._compression_layout, values, sample, reserve)
        return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

    def _checked_turn(self, turn: Any, index: int, sample: Any) -> tuple[list[int], list[bool]]:
        if isinstance(turn, dict):
            question, answer = turn.get("question"), turn.get("answer")
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            question, answer = turn
        else:
            raise CoMaInputError(f"turn {index} must be a {{'question', 'answer'}} dict", sample, "conversation")
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise CoMaInputError(f"turn {index} has an empty or missing {name}", sample, "conversation")
        return self._turn(question, answer)

    def render_question(self, question: str) -> list[int]:
        """`<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n`: what follows the compression tokens
        when asking."""
        return self._turn(question, None)[0]

    def _render(self, item: EmbeddingInput, instruction: str | None, sample: Any) -> RenderedSample:
        """`item` rendered, with `instruction` when it carries none of its own."""
        own = item.instruction if item.instruction is not None else instruction
        return self.render_embedding_input(item.text, item.image, own, sample=sample, layout=item.layout)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tokenize: bool = False,
        return_dict: bool = False,
        **kwargs,
    ) -> BatchFeature | list[str] | str:
        """Render chat messages as embedding inputs: how sentence-transformers' `Transformer` module feeds CoMa.

        One conversation is `[{"role": "system", "content": instruction}, {"role": "user", "content": …}]`, the
        system message optional; content is a string or a list of `{"type": "text", "text": …}` and
        `{"type": "image", "image": …}` items (at most one image). The system message goes to CoMa's instruction
        slot (that is where sentence-transformers puts a prompt such as `prompt_name="query"`), so rendering
        matches `process_embedding_inputs` exactly; `chat_template` and sentence-transformers' tokenizer and
        truncation keywords are ignored (`max_length` is the processor's own).

        Returns the padded `BatchFeature` when `tokenize=True`, else the rendered text of each conversation.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        inputs = [message_input(messages, index) for index, messages in enumerate(conversations)]
        try:
            rendered = [self._render(item, None, sample=index) for index, item in enumerate(inputs)]
        except CoMaInputError as error:  # sentence-transformers reorders inputs: name it by content, not position
            position = error.position_in(inputs)
            if position is None:
                raise
            raise CoMaInputError(error.reason, inputs[position].describe(), error.field) from error
        if not tokenize:
            texts = [self.tokenizer.decode(sample.input_ids) for sample in rendered]
            return texts if batched else texts[0]
        batch = self.collate(rendered)
        if BatchKey.PIXEL_VALUES in batch:  # sentence-transformers' GradCache cuts image rows per sample by it
            batch[BatchKey.IMAGES_PER_SAMPLE] = torch.tensor([int(item.image is not None) for item in inputs])
        return batch
