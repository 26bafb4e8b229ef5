"""Test helpers: tiny backbones built offline (seconds, CPU), deterministic images, the example scripts as modules
and their command lines, quiet TrainingArguments, and offline child interpreters (with a Hub cache to load from,
and without the package)."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import TrainingArguments

from coma_hf.tiny import build_tiny_coma

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The files `save_pretrained` copies into every checkpoint: what `trust_remote_code=True` runs.
REMOTE_CODE_FILES = frozenset(
    {
        "modeling_coma.py",
        "configuration_coma.py",
        "processing_coma.py",
        "constants_coma.py",
        "layout_coma.py",
        "rendering_coma.py",
        "encoding_coma.py",
        "building_coma.py",
        "inputs.py",
        "saving.py",
        "masking.py",
        "backbones.py",
        "sentence_transformers_files.py",
        "vision_attention.py",
    }
)
# The smallest model the example scripts build from scratch (stage 1, and stage 2 with --from_backbone): random
# weights, not the shipped reader, so that script tests stay fast.
TINY_MODEL_ARGS = (
    "--tiny_init random --tiny_hidden_size 32 --num_compression_tokens 4 --min_image_tokens 4 --max_image_tokens 4"
).split()


@functools.cache
def _tiny(family: str, attn_implementation: str, num_compression_tokens: int):
    torch.manual_seed(0)
    return build_tiny_coma(
        family, num_compression_tokens=num_compression_tokens, attn_implementation=attn_implementation
    )


def tiny_coma(family: str = "qwen2_5_vl", attn_implementation: str = "sdpa", num_compression_tokens: int = 4):
    """A cached (model, processor) pair in float32 eval mode; tests must not modify the model in place."""
    model, processor = _tiny(family, attn_implementation, num_compression_tokens)
    return model.eval(), processor


def random_image(seed: int = 0, size: tuple[int, int] = (84, 112)) -> Image.Image:
    """A deterministic RGB noise image of `size` (width, height)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@functools.cache
def _tiny_sentence_transformer(family: str, num_compression_tokens: int, folder: str):
    from sentence_transformers import SentenceTransformer

    model, _ = _tiny(family, "sdpa", num_compression_tokens)
    model.save_pretrained(folder)
    return SentenceTransformer(folder, trust_remote_code=True, device="cpu")


def tiny_sentence_transformer(tmp_path_factory, family: str = "qwen2_5_vl", num_compression_tokens: int = 4):
    """A SentenceTransformer over a saved tiny CoMa checkpoint (cached per session; copy it before training)."""
    folder = tmp_path_factory.getbasetemp() / f"st-{family}-{num_compression_tokens}"
    return _tiny_sentence_transformer(family, num_compression_tokens, str(folder))


def load_example(name: str):
    """The module of `examples/{name}.py`, imported fresh."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_script", Path(__file__).parents[1] / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def script_segments(arguments: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`(script, its arguments)` for each `-- SCRIPT ARGS` segment of `arguments` (as the launched helpers in
    tests/distributed take them), in order; anything before the first `--` is not a segment."""
    separators = [index for index, value in enumerate(arguments) if value == "--"] + [len(arguments)]
    segments = [list(arguments[begin + 1 : end]) for begin, end in zip(separators, separators[1:], strict=False)]
    return [(segment[0], segment[1:]) for segment in segments]


def command_line(fixed: str = "", **options: object) -> list[str]:
    """The tokens of `fixed` (split on spaces), then `--name value` for each keyword option, its value as `str`."""
    return fixed.split() + [token for name, value in options.items() for token in (f"--{name}", str(value))]


def training_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    """Quiet, seeded CPU TrainingArguments (batch 4, 6 steps, loss logged every step, no saving) with `overrides`."""
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def run_python(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The finished `python *args` in `cwd`: offline, HF_HOME `home`, no inherited HF_*/PYTHONPATH; asserts exit 0."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# What a child interpreter runs first to stand for a machine without the package: `import coma_hf` (or of any of its
# modules) then fails, so that only a checkpoint's own remote code can run.
WITHOUT_COMA_PRELUDE = 'import sys\nsys.modules["coma_hf"] = None\n'


def run_without_coma(
    program: str | Path, args: Sequence[object], home: Path, cwd: Path
) -> subprocess.CompletedProcess:
    """`run_python` of `program` with `args` (as `str`, in `sys.argv[1:]`) after `WITHOUT_COMA_PRELUDE`: `program` is
    Python source (dedented) or a script's `Path`, run as `python SCRIPT` runs it (`runpy`, as `__main__`)."""
    if isinstance(program, Path):
        code = f"import runpy\nrunpy.run_path({str(program)!r}, run_name='__main__')\n"
    else:
        code = textwrap.dedent(program)
    return run_python(["-c", WITHOUT_COMA_PRELUDE + code, *map(str, args)], home, cwd)


def hub_cache(folder: Path, home: Path, repo_id: str) -> None:
    """Lays `folder` out under `home` as the Hub cache snapshot of `repo_id` (main at a fixed commit)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
