"""An independent re-implementation of the authors' released evaluation (GitHub `Trustworthy-Information-Access/CoMa`,
`eval.py` with `--pooling eos --normalize true`) on stock transformers classes, for `tests/test_released_parity.py`.

It runs in its own interpreter where `coma_hf` cannot be imported (`utils.run_without_coma`: it must not use the
package it checks), reads a checkpoint in the release's format (the stock Qwen2.5-VL class loads their older key names)
and writes, with `safetensors`:

* `plain/{name}`: the vector of each plain input (an image, a text, an image and a text) as their classification
  query preparation renders it with the input's text as the instruction;
* `{dataset}/scores/{row}`: each row's query-candidate cosines (gold first) for a folder of MMEB-V2 instruct rows,
  prepared as their data parsers do (`src/data/eval_dataset/image_*.py`), candidates deduplicated by name, first kept.

Their path, per sample: the prompt string, the K `<|ctoken_pad_i|>` tokens appended, the stock processor (the vision
block expanded, images under 28 px resized to 56 × 56 first, 3,136 to 1,003,520 pixels), plain causal attention, the
final hidden state at the last position, L2-normalised. Usage:
`python released_reference.py SOURCE SPEC.json OUTPUT.safetensors` (SPEC: `{"plain": {name: {"image", "text"}},
"mmeb_v2": {"folder", "image_root", "datasets": {name: parser}}}`).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = "<|image_1|>"
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 1280


class StockProcessor(transformers.Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)


def process_input_text(instruction, text=None, add_image_token=False):
    prompt = instruction
    if text:
        prompt = prompt + " " + text
    if add_image_token:
        prompt = VISION + " " + prompt
    return prompt


class Reference:
    def __init__(self, source):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        count = sum(token.startswith("<|ctoken_pad_") for token in self.tokenizer.get_vocab())
        self.compress_tokens = "".join(f"<|ctoken_pad_{index}|>" for index in range(count))
        self.last_token_id = self.tokenizer.convert_tokens_to_ids(f"<|ctoken_pad_{count - 1}|>")
        image_class = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)
        image_processor = image_class.from_pretrained(
            source, size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
        )
        self.processor = StockProcessor(image_processor=image_processor, tokenizer=self.tokenizer)
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()

    @torch.no_grad()
    def embed(self, prompt, image_path=None):
        text = prompt + self.compress_tokens
        if image_path is None:
            inputs = self.processor(text=[text], return_tensors="pt")
        else:
            image = Image.open(image_path)
            if image.size[0] < 28 or image.size[1] < 28:
                image = image.resize((56, 56))
            inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        hidden = self.model.model(**inputs).last_hidden_state
        assert inputs["input_ids"][0, -1].item() == self.last_token_id, "pooled at the last compression token"
        return F.normalize(hidden[0, -1], dim=-1)


def classification_query(instruction, text, image_path):
    prompt = process_input_text(instruction.replace(PLACEHOLDER, ""), text=text, add_image_token=True)
    return prompt.replace(" \n", "\n") + "\n", image_path


def question_query(instruction, text, image_path):
    instruction = "\n" + instruction.replace(PLACEHOLDER, "").strip()
    prompt = process_input_text(instruction, text=text, add_image_token=True)
    return prompt.replace(" \n", "\n") + "\n", image_path


def image_candidates(row, root, newline_without_captions):
    instruction = row["tgt_inst"].replace(PLACEHOLDER, "")
    paths = [os.path.join(root, path) for path in row["tgt_img_path"]]
    if row["tgt_text"][0].strip():
        prompts = [
            process_input_text(instruction + " " + caption, text="", add_image_token=True).replace(" \n", "\n") + "\n"
            for caption in row["tgt_text"]
        ]
    else:
        prompt = process_input_text(instruction, text="", add_image_token=True).replace(" \n", "\n")
        prompts = [prompt + ("\n" if newline_without_captions else "")] * len(paths)
    return list(zip(prompts, paths, strict=False))


def parse(parser, dataset, row, root):
    """(query (prompt, image), candidates [(prompt, image)], candidate names) as their parser prepares a row."""
    if parser in ("image_cls", "image_i2t", "image_qa"):
        prepare = question_query if parser == "image_qa" else classification_query
        query = prepare(row["qry_inst"], row["qry_text"], os.path.join(root, row["qry_img_path"]))
        return query, [(text, None) for text in row["tgt_text"]], list(row["tgt_text"])
    if parser == "image_t2i":
        prompt = row["qry_inst"] + " " + row["qry_text"] + "\n" + ("\n" if dataset == "VisDial" else "")
        return (prompt, None), image_candidates(row, root, True), list(row["tgt_img_path"])
    if parser == "image_i2i_vg":
        query = question_query(row["qry_inst"], row["qry_text"], os.path.join(root, row["qry_img_path"]))
        names = [
            path + ":" + caption.strip('"')
            for path, caption in zip(row["tgt_img_path"], row["tgt_text"], strict=False)
        ]
        return query, image_candidates(row, root, False), names
    raise ValueError(parser)


def main(source, spec_path, output):
    try:
        import coma_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("coma_hf must not be importable in the reference process")
    spec = json.loads(open(spec_path).read())
    reference = Reference(source)
    tensors = {}
    for name, item in spec.get("plain", {}).items():
        image, text = item.get("image"), item.get("text")
        if image is None:
            prompt = text.replace(" \n", "\n") + "\n"  # the same rule with no vision block
        else:
            prompt = process_input_text(text or "", add_image_token=True).replace(" \n", "\n") + "\n"
        tensors[f"plain/{name}"] = reference.embed(prompt, image)
    mmeb = spec.get("mmeb_v2")
    for dataset, parser in (mmeb or {}).get("datasets", {}).items():
        rows = [json.loads(line) for line in open(os.path.join(mmeb["folder"], f"{dataset}.jsonl"))]
        first = {}
        for index, row in enumerate(rows):
            query, candidates, names = parse(parser, dataset, row, mmeb["image_root"])
            for name, candidate in zip(names, candidates, strict=False):
                first.setdefault(name, candidate)
            query_vector = reference.embed(*query)
            candidate_vectors = torch.stack([reference.embed(*first[name]) for name in names])
            tensors[f"{dataset}/scores/{index}"] = candidate_vectors @ query_vector
    save_file({key: value.contiguous() for key, value in tensors.items()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
