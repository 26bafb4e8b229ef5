"""How an input's parts become token ids: `InputLayout` (the order of the parts and the separators between them, and
the rules of its two modes), `render_parts` / `render_prompt` (a layout's pieces as token ids) and `fit_to_length`,
the one truncation rule: only the text gives way, from its end, and an input whose other parts alone do not fit is an
error naming the sample and the field.

Part of the remote code shipped with every checkpoint: imports only torch, sibling files and the standard library.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .inputs import CoMaInputError

Encode = Callable[[str], list[int]]  # text → token ids (the processor's memoised tokenizer call)
Fit = Callable[[list[list[int]], Sequence[int]], tuple[list[int], int]]  # `fit_to_length` with the input's limits


class InputLayout:
    """The order of an input's parts and the separators between them, parsed from a template such as
    `"{image}{instruction}\\n{text}{compression}"`, and how the parts become tokens.

    The slots are `{image}` (the vision block), `{instruction}`, `{text}` (the only part truncated to fit
    `max_length`) and `{compression}` (the K compression tokens, last: the answers or the pooling follow them); each
    at most once, `{compression}` required. Text between two slots is a separator, written only when both of its
    slots are present.

    A layout is saved as its template (the defaults below) or as a dict `{"template": …, option: value, …}`
    (`from_spec`, `spec`). Every rule of the two modes and the options, in one place (examples: `V` = the vision block,
    `<cmp>` = the K compression tokens, `\\n` = a newline; `\\n` and spaces in a template are its separators):

    ========================  =========================================================================================
    rule                      what it does, then an example (layout; input → rendered)
    ========================  =========================================================================================
    `mode: "parts"`           the default, how CoMa checkpoints are trained. A separator is tokenized with the
                              instruction it touches, the text alone; an absent or empty part writes nothing, nor do
                              its separators. A text holding an image placeholder (`image_placeholder`) and given an
                              image is that text with `V` at the first placeholder, nothing else added; without an
                              image, the placeholders are removed.
                              `{image}{instruction}\\n{text}{compression}`; image, "Find it.", "a cat" →
                              `VFind it.\\na cat<cmp>`; image, "<|image_1|> a cat" → `V a cat<cmp>`;
                              "a cat" alone → `a cat<cmp>`.
    `mode: "prompt"`          the parts are joined into one prompt string, as a stock processor is handed one, and
                              each stretch of it between `V` and `<cmp>` is tokenized at once; the instruction, where
                              a prompt starts, is present whenever given, even empty; image placeholders are removed
                              from instruction and text (a prompt has no place for them).
                              `{image} {instruction} {text}{compression}`; image, "<|image_1|> Find it.", "a cat" →
                              `V  Find it. a cat<cmp>`; image, instruction "" → `V <cmp>`.
    `clean_space_newline`     prompt mode: every " \\n" of a complete stretch becomes "\\n" (the release's evaluation
                              cleans its image prompts so). Instruction "Find \\n", text "a cat" →
                              `V Find\\n a cat<cmp>`.
    `trailing_newline`        prompt mode: "\\n" at the end of the prompt text, after the clean-up, whatever is
                              present (with K = 0 too, where nothing follows it); a text cut for `max_length` is cut
                              before it. The prompt layout above; image, "Find it.", "a cat" →
                              `V Find it. a cat\\n<cmp>`; with K = 0 → `V Find it. a cat\\n`.
    `text_as_instruction`     an input given without an instruction has its text (or, without one, "") in the
                              instruction slot (the release's classification queries, and the plain API of a converted
                              checkpoint). The released `embedding_layout` (prompt, both options above and this one);
                              image, "a cat" → `V a cat\\n<cmp>`; image alone → `V \\n<cmp>`.
    ========================  =========================================================================================

    Prompt mode and its three options are compatibility with the authors' release (their evaluation, which a converted
    checkpoint's processor config records); the method's values are the defaults: parts mode, every option off.
    """

    SLOTS = ("image", "instruction", "text", "compression")
    MODES = ("parts", "prompt")
    OPTIONS = ("mode", "clean_space_newline", "trailing_newline", "text_as_instruction")

    def __init__(
        self,
        template: str,
        mode: str = "parts",
        clean_space_newline: bool = False,
        trailing_newline: bool = False,
        text_as_instruction: bool = False,
    ):
        self.template = template
        self.parts = [part for part in re.split(r"(\{\w+\})", template) if part]
        slots = [part[1:-1] for part in self.parts if _is_slot(part)]
        unknown = sorted(set(slots) - set(self.SLOTS))
        valid = slots and _is_slot(self.parts[0]) and slots[-1] == "compression" and len(slots) == len(set(slots))
        if unknown or not valid:
            raise ValueError(
                f"invalid input layout {template!r}: start with a slot, use each of {{image}}, {{instruction}}, "
                f"{{text}} at most once and end with {{compression}}"
                + (f" (unknown slots {unknown})" if unknown else "")
            )
        if mode not in self.MODES:
            raise ValueError(f"invalid input layout {template!r}: mode must be one of {self.MODES}, got {mode!r}")
        if mode != "prompt" and (clean_space_newline or trailing_newline):
            raise ValueError(
                f"invalid input layout {template!r}: clean_space_newline and trailing_newline need mode "
                "'prompt' (they act on the joined prompt)"
            )
        if text_as_instruction and "instruction" not in slots:
            raise ValueError(f"invalid input layout {template!r}: text_as_instruction needs an {{instruction}} slot")
        self.mode = mode
        self.clean_space_newline = clean_space_newline
        self.trailing_newline = trailing_newline
        self.text_as_instruction = text_as_instruction

    @classmethod
    def from_spec(cls, spec: str | dict | InputLayout) -> InputLayout:
        """A layout from its saved form: a template string, or `{"template": …, **options}`."""
        if isinstance(spec, InputLayout):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if not isinstance(spec, dict) or "template" not in spec:
            raise ValueError(f"invalid input layout {spec!r}: expected a template string or a dict with 'template'")
        unknown = sorted(set(spec) - {"template", *cls.OPTIONS})
        if unknown:
            raise ValueError(f"invalid input layout {spec!r}: unknown options {unknown} (known: {cls.OPTIONS})")
        return cls(**spec)

    @property
    def spec(self) -> str | dict:
        """The saved form: the template alone when every option has its default, else a dict."""
        defaults = inspect.signature(type(self).__init__).parameters
        options = {name: getattr(self, name) for name in self.OPTIONS if getattr(self, name) != defaults[name].default}
        return {"template": self.template, **options} if options else self.template

    def slot_values(self, image: Any, instruction: str | None, text: str | None, compression: Any) -> dict[str, Any]:
        """The value of each slot for an input's parts (`text_as_instruction` applied)."""
        if self.text_as_instruction and instruction is None:
            instruction, text = text or "", None
        return {"image": image, "instruction": instruction, "text": text, "compression": compression}

    def pieces(self, values: dict[str, Any]) -> list[tuple[str, Any]]:
        """`(slot or "separator", value)` in order, for the slots present (non-empty `values`; in prompt mode an
        instruction is present whenever it is not `None`) and the separators between two present slots."""
        pieces: list[tuple[str, Any]] = []
        for position, part in enumerate(self.parts):
            if _is_slot(part):
                if self._present(part[1:-1], values):
                    pieces.append((part[1:-1], values[part[1:-1]]))
            elif self._present_on_both_sides(position, values):
                pieces.append(("separator", part))
        return pieces

    def _present(self, slot: str, values: dict[str, Any]) -> bool:
        value = values.get(slot)
        if slot == "instruction" and self.mode == "prompt":
            return value is not None  # a prompt starts from its instruction, empty or not
        return bool(value)

    def _present_on_both_sides(self, position: int, values: dict[str, Any]) -> bool:
        before, after = self.parts[position - 1 : position], self.parts[position + 1 : position + 2]
        return bool(
            before and after and self._present(before[0][1:-1], values) and self._present(after[0][1:-1], values)
        )


def _is_slot(part: str) -> bool:
    return part.startswith("{") and part.endswith("}")


@dataclass
class RenderedSample:
    """One sample as token ids, before padding.

    Attributes:
        input_ids: the whole sequence.
        labels: per-token targets (`-100` = no loss), or `None` for embedding inputs.
        pixel_values: `[num_patches, patch_dim]` of the sample's image, or `None`.
        image_grid_thw: `[1, 3]` grid of the sample's image, or `None`.
        dropped_turns: stage-1 QA turns left out because they did not fit in `max_length`.
        truncated_text_tokens: input-text tokens cut to fit in `max_length`.
    """

    input_ids: list[int]
    labels: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    dropped_turns: int = 0
    truncated_text_tokens: int = 0


def render_parts(layout: InputLayout, values: dict[str, Any], encode: Encode, fit: Fit) -> tuple[list[int], int]:
    """A parts-mode layout: each instruction with the separators it touches is tokenized as one piece, the text
    alone, the vision block and the compression tokens as given; then `fit` cuts the text. Returns the ids and the
    text tokens cut."""
    pieces: list[list[int]] = []
    text_pieces, words = [], ""
    for slot, value in layout.pieces(values):
        if slot in ("instruction", "separator"):
            words += value
            continue
        if words:
            pieces.append(encode(words))
            words = ""
        if slot == "text":
            text_pieces.append(len(pieces))
        pieces.append(encode(value) if slot == "text" else list(value))
    if words:
        pieces.append(encode(words))
    return fit(pieces, text_pieces)


def render_prompt(layout: InputLayout, values: dict[str, Any], encode: Encode, fit: Fit) -> tuple[list[int], int]:
    """A prompt-mode layout: the text between the vision block and the compression tokens is joined into stretches of
    prompt text, each cleaned as the layout says once complete, the last then given the trailing newline (with K = 0
    too), and each tokenized at once as a stock processor tokenizes a prompt. When the stretch holding the text is
    cut, it is cut without the trailing newline, which then follows as its own tokens."""
    stretches: list[list[int] | str] = []  # token ids (the vision block) or stretches of prompt text
    text_index = None
    for slot, value in layout.pieces(values):
        if slot == "compression":  # always the last slot
            break
        if slot == "image":
            _finish_stretch(stretches, layout)
            stretches.append(list(value))
        elif stretches and isinstance(stretches[-1], str):
            stretches[-1] += value
        else:
            stretches.append(value)
        if slot == "text":
            text_index = len(stretches) - 1
    _finish_stretch(stretches, layout)
    newline = "\n" if layout.trailing_newline else ""  # after the clean-up, as the release writes it
    ends_in_text = bool(stretches) and isinstance(stretches[-1], str)
    if ends_in_text:
        stretches[-1] += newline
    elif newline:
        stretches.append(newline)
    compression = list(values["compression"])
    pieces = [encode(stretch) if isinstance(stretch, str) else stretch for stretch in stretches]
    text_pieces = [] if text_index is None else [text_index]
    ids, cut = fit([*pieces, compression], text_pieces)
    if not cut or not newline or not ends_in_text or text_index != len(stretches) - 1:
        return ids, cut
    pieces[text_index] = encode(stretches[text_index][: -len(newline)])
    return fit([*pieces, encode(newline), compression], text_pieces)


def _finish_stretch(stretches: list, layout: InputLayout) -> None:
    """Clean the stretch of prompt text that ends `stretches`, now complete, as `layout` asks (" \\n" → "\\n")."""
    if stretches and isinstance(stretches[-1], str) and layout.clean_space_newline:
        stretches[-1] = stretches[-1].replace(" \n", "\n")


def fit_to_length(
    pieces: list[list[int]],
    text_pieces: Sequence[int],
    max_length: int | None,
    reserve: int = 0,
    sample: Any = None,
    field: str = "instruction",
) -> tuple[list[int], int]:
    """`pieces` joined, the ones at `text_pieces` (the text, in order) losing tokens from the end of the last first,
    so that all of them and `reserve` tokens after them (stage 1's first QA turn) fit in `max_length` (`None`: no
    limit). Returns the ids and the tokens cut; when the other pieces alone leave too little room, a `CoMaInputError`
    naming the sample and `field`."""
    fixed = sum(len(piece) for index, piece in enumerate(pieces) if index not in text_pieces)
    room = None
    if max_length is not None:
        if fixed + reserve > max_length:
            raise CoMaInputError(_no_room(fixed, reserve, max_length), sample, field)
        room = max_length - fixed - reserve
    pieces = [list(piece) for piece in pieces]
    total = sum(len(pieces[index]) for index in text_pieces)
    cut = 0 if room is None else max(0, total - room)
    remaining = cut
    for index in reversed(text_pieces):
        take = min(remaining, len(pieces[index]))
        del pieces[index][len(pieces[index]) - take :]
        remaining -= take
    return [token for piece in pieces for token in piece], cut


def blamed_field(values: dict[str, Any], reserve: int) -> str:
    """The field named when an input's fixed parts leave no room: the first QA turn, else the image (the largest
    fixed part), else the instruction."""
    return "conversation" if reserve else "image" if values.get("image") else "instruction"


def _no_room(fixed: int, reserve: int, max_length: int) -> str:
    if reserve:
        return (
            f"the first question and answer cannot fit: image, instruction and compression tokens take {fixed} "
            f"tokens and the first turn {reserve}, more than max_length={max_length}"
        )
    return f"the image, instruction and compression tokens take {fixed} tokens, more than max_length={max_length}"
