"""What `trust_remote_code=True` runs: the Python files a checkpoint ships import nothing beyond torch, transformers,
Pillow, numpy and a short list of standard-library modules; make no network calls; never `exec`/`eval`, unpickle or
`torch.load`; and the weights are safetensors only."""

from __future__ import annotations

import ast

import pytest
import torch

from utils import REMOTE_CODE_FILES, tiny_coma

ALLOWED_MODULES = {
    "__future__",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "importlib.metadata",
    "inspect",
    "io",
    "json",
    "logging",
    "math",
    "os",
    "re",
    "shutil",
    "tempfile",
    "typing",
    "functools",
    "itertools",
    "contextlib",
    "threading",  # a lock, no I/O
    "warnings",
    "numpy",
    "PIL",
}
ALLOWED_PACKAGES = ("torch", "transformers", "PIL")  # and their submodules
FORBIDDEN_NAMES = {
    "load_image",
    "hf_hub_download",
    "snapshot_download",
    "cached_file",
    "urlopen",
    "get_file_from_repo",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_ATTRIBUTE_CALLS = {
    ("torch", "load"),
    ("jit", "load"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("os", "system"),
    ("os", "popen"),
    ("os", "exec"),
    ("np", "load"),
    ("numpy", "load"),
    ("importlib", "import_module"),
    ("requests", "get"),
    ("urllib", "request"),
}


def violations(source: str, name: str = "<source>") -> list[str]:
    """Every import outside the allowed set and every forbidden call in `source`, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {alias.name}" for alias in node.names if not _allowed(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not _allowed(node.module or ""):
                found.append(f"{where}: from {node.module} import …")
            if node.level == 0:  # a sibling file's own names (scanned here too) are not the libraries' fetchers
                found += [f"{where}: imports {alias.name}" for alias in node.names if alias.name in FORBIDDEN_NAMES]
        elif isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in FORBIDDEN_CALLS:
                found.append(f"{where}: calls {function.id}()")
            if isinstance(function, ast.Attribute) and isinstance(function.value, (ast.Name, ast.Attribute)):
                owner = function.value.id if isinstance(function.value, ast.Name) else function.value.attr
                if (owner, function.attr) in FORBIDDEN_ATTRIBUTE_CALLS:
                    found.append(f"{where}: calls {owner}.{function.attr}()")
    return found


def _allowed(module: str) -> bool:
    return module in ALLOWED_MODULES or module.split(".")[0] in ALLOWED_PACKAGES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    model, _ = tiny_coma()
    model.save_pretrained(folder)
    return folder


def test_the_shipped_files_pass_the_scan(checkpoint):
    shipped = {path.name for path in checkpoint.glob("*.py")}
    assert shipped == REMOTE_CODE_FILES  # exactly these files run under trust_remote_code
    for name in sorted(shipped):
        assert violations((checkpoint / name).read_text(), name) == [], name


@pytest.mark.parametrize(
    "source, what",
    [
        ("import socket", "import socket"),
        ("from urllib.request import urlopen", "from urllib.request"),
        ("import pickle\npickle.loads(b'')", "import pickle"),
        ("import torch\nstate = torch.load('weights.pt')", "calls torch.load()"),
        ("eval('1 + 1')", "calls eval()"),
        ("exec('x = 1')", "calls exec()"),
        ("from transformers.image_utils import load_image", "imports load_image"),
        ("from huggingface_hub import hf_hub_download", "from huggingface_hub"),
        ("import subprocess", "import subprocess"),
        ("import os\nos.system('ls')", "calls os.system()"),
        ("import importlib\nimportlib.import_module('socket')", "import importlib"),
    ],
)
def test_the_scan_catches_what_it_forbids(source, what):
    assert any(what in violation for violation in violations(source))


def test_weights_are_safetensors_only(checkpoint, tmp_path):
    from transformers import AutoModel

    weight_files = [
        path.name
        for path in checkpoint.iterdir()
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".msgpack", ".h5")
    ]
    assert weight_files == ["model.safetensors"]
    # a folder that offers only a pickled state dict is refused rather than unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for path in checkpoint.iterdir():
        if path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    model, _ = tiny_coma()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        AutoModel.from_pretrained(pickled, trust_remote_code=True)
