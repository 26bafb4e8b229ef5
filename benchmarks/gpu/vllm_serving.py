"""A CoMa checkpoint served by vLLM against `CoMaModel.encode`, on your own GPU machine (vLLM's wheel is CUDA-only
and pins its own torch: nothing in this repository's CI can run it).

    pip install vllm                      # in a venv of its own, with coma_hf installed beside it
    python benchmarks/gpu/vllm_serving.py --checkpoint org/coma --export_dir outputs/coma-stock

Writes the stock export (`coma_hf.serving.export_stock_backbone`) when `--export_dir` has none, then embeds the same
inputs (synthetic scenes: image, text, and image + text) two ways, in `--dtype`:

- transformers: `CoMaModel.encode`, batches of `--batch_size`;
- vLLM: `LLM(export, runner="pooling", convert="embed")`, each input sent as `vllm_prompt` renders it,
  `llm.encode(..., pooling_task="token_embed")` for every position's final state, pooled by `pool_token_states`.

Records the agreement of the vectors (cosine of each pair: minimum and mean) and the throughput of each path
(inputs/s, after one warm-up batch; vLLM's includes rendering each request on the client, as a user's would), prints a
table and writes JSON. Until it runs on such a machine,
`docs/performance.md` says "pending: needs vLLM on a GPU".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from coma_hf.serving import POOLING_FILE, export_stock_backbone, pool_token_states, vllm_prompt


def scene_inputs(count: int) -> list[dict]:
    """`count` inputs cycling image, text and image + text over synthetic scenes (written to a temporary folder)."""
    from coma_hf.data.sources import read_jsonl_records
    from coma_hf.data.synthetic import write_synthetic_dataset

    folder = Path(tempfile.mkdtemp(prefix="vllm-serving-"))
    paths = write_synthetic_dataset(folder, num_train=max(1, count // 3 + 1), num_dev=1, num_test=1)
    scenes = read_jsonl_records(paths["train"])
    inputs = []
    for index in range(count):
        scene = scenes[(index // 3) % len(scenes)]
        image, caption = str(folder / scene["image"]), scene["caption"]
        inputs.append([{"image": image}, {"text": caption}, {"image": image, "text": caption}][index % 3])
    return inputs


def vllm_vectors(
    llm: Any, processor: Any, inputs: list[dict], spec: dict, instruction: str | None, pooling_params: Any = None
) -> torch.Tensor:
    """Embeddings of `inputs` through a vLLM pooling model `llm` (anything with vLLM's `LLM.encode`): every
    position's final state (`token_embed`, no activation), pooled as the spec says."""
    if pooling_params is None:
        from vllm import PoolingParams

        pooling_params = PoolingParams(use_activation=False)
    prompts = [vllm_prompt(processor, item, instruction, sample=index) for index, item in enumerate(inputs)]
    outputs = llm.encode(prompts, pooling_task="token_embed", pooling_params=pooling_params)
    return torch.stack([pool_token_states(output.outputs.data, spec) for output in outputs])


def agreement(served: torch.Tensor, expected: torch.Tensor) -> dict:
    """Cosine of each served vector with its `encode` vector: the minimum and the mean."""
    cosines = torch.nn.functional.cosine_similarity(served.float(), expected.float(), dim=-1)
    return {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}


def timed(function, *args) -> tuple[Any, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args)
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoMa checkpoint (folder or Hub id)")
    parser.add_argument("--export_dir", required=True, help="its stock export (written when missing)")
    parser.add_argument("--num_inputs", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32, help="CoMaModel.encode's batch size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--role", choices=("query", "document"), default="document")
    parser.add_argument("--output", default="benchmarks/results/vllm_serving.json")
    args = parser.parse_args(argv)
    from transformers import AutoModel
    from vllm import LLM

    export = Path(args.export_dir)
    if not (export / POOLING_FILE).exists():
        export_stock_backbone(args.checkpoint, export, dtype=args.dtype)
    spec = json.loads((export / POOLING_FILE).read_text())
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(args.checkpoint, trust_remote_code=True, dtype=dtype).to("cuda").eval()
    instruction = spec[f"{args.role}_instruction"]
    inputs = scene_inputs(args.num_inputs)
    model.encode(inputs[: args.batch_size], instruction=instruction, batch_size=args.batch_size)  # warm-up
    expected, encode_seconds = timed(model.encode, inputs, instruction, args.batch_size)
    processor = model.processor
    del model  # vLLM takes a share of the GPU's memory at start and refuses to start without it
    torch.cuda.empty_cache()

    llm = LLM(model=str(export), runner="pooling", convert="embed", dtype=args.dtype)
    vllm_vectors(llm, processor, inputs[: args.batch_size], spec, instruction)  # warm-up
    served, vllm_seconds = timed(vllm_vectors, llm, processor, inputs, spec, instruction)
    result = {
        "machine": torch.cuda.get_device_name(),
        "checkpoint": args.checkpoint,
        "dtype": args.dtype,
        "inputs": len(inputs),
        **agreement(served, expected),
        "transformers_inputs_per_s": len(inputs) / encode_seconds,
        "vllm_inputs_per_s": len(inputs) / vllm_seconds,
    }
    result["vllm_speedup"] = result["vllm_inputs_per_s"] / result["transformers_inputs_per_s"]
    print("| path | inputs/s | min cosine with encode |\n| --- | --- | --- |")
    print(f"| CoMaModel.encode | {result['transformers_inputs_per_s']:.1f} | 1 |")
    print(f"| vLLM token_embed + pool_token_states | {result['vllm_inputs_per_s']:.1f} | {result['min_cosine']:.4f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
