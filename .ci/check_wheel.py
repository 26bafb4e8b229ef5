"""CI: what a non-editable install ships. Run with the Python of a venv where only the built wheel is installed, from
a folder outside the source tree, with the source tree's path as the argument:

    python .ci/check_wheel.py SOURCE_TREE

An editable install reads the model-card template (setup.cfg `data_files`) and the package resources
(`package_data`) from the checkout, so only an installed wheel shows whether they ship. Exits non-zero if anything
is missing: coma_hf imported from the checkout, no LICENSE, no template under `share/`, no resources (the tiny corpus,
the shipped reader), no card in a saved checkpoint, or a checkpoint that does not reload through its remote code with
the same vectors.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

TEXTS = ["a red square", "a blue circle left of a green triangle"]


def _inputs() -> dict:
    return {"encode_text": TEXTS, "encode_images": [Image.new("RGB", (56, 56), "red")]}


@torch.no_grad()
def _vectors(model) -> dict[str, torch.Tensor]:
    return {encode: getattr(model, encode)(inputs) for encode, inputs in _inputs().items()}


def check_installed(source_tree: Path) -> None:
    """coma_hf comes from the venv, and carries its template and resources."""
    from importlib import resources

    import coma_hf
    from coma_hf.hub import template_path

    package = Path(coma_hf.__file__).resolve()
    assert not package.is_relative_to(source_tree.resolve()), f"coma_hf imported from the checkout: {package}"
    installed = Path(sys.prefix) / "share" / "coma_hf" / "model_cards" / "coma.md"
    assert installed.is_file(), f"the model-card template is not installed at {installed} (setup.cfg data_files)"
    assert template_path() == installed, f"the card template resolves to {template_path()}, not {installed}"
    from importlib.metadata import distribution

    licences = [file for file in distribution("coma_hf").files or [] if file.name == "LICENSE"]
    assert licences and "Apache License" in licences[0].read_text(), "the wheel carries no LICENSE (license_files)"
    corpus = resources.files("coma_hf").joinpath("resources/tiny_corpus.txt")
    assert corpus.is_file(), "coma_hf/resources/tiny_corpus.txt is not installed (setup.cfg package_data)"
    from coma_hf.reader import load_reader, reader_path, reader_record

    assert reader_path().is_relative_to(package.parent), f"the reader resolves outside the package: {reader_path()}"
    reader, _ = load_reader()  # weights, config, tokenizer and image processor all shipped
    assert sum(p.numel() for p in reader.parameters()) == reader_record()["model"]["parameters"], "reader mismatch"


def save_tiny_checkpoint(folder: Path, vectors: Path) -> None:
    """Save a tiny checkpoint with the installed package (card included) and its vectors beside it."""
    from coma_hf.hub import save_checkpoint, template_path
    from coma_hf.tiny import build_tiny_coma

    model, _ = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    save_checkpoint(model, folder)
    card = (folder / "README.md").read_text(encoding="utf-8")
    template = template_path().read_text(encoding="utf-8").splitlines()
    title = next(line for line in template if line.startswith("A **CoMa**"))  # the card's first sentence
    assert title in card and "{{" not in card, f"README.md is not the rendered CoMa card:\n{card[:500]}"
    torch.save(_vectors(model), vectors)


def check_reload(folder: Path, vectors: Path) -> None:
    """In a process that never imports coma_hf: AutoModel loads the checkpoint's own code, same vectors."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), "not loaded through the checkpoint's code"
    expected = torch.load(vectors)
    for encode, vector in _vectors(model).items():
        assert torch.allclose(expected[encode], vector, atol=1e-5), f"{encode}: the reloaded checkpoint differs"
    assert "coma_hf" not in sys.modules, "the checkpoint's remote code imported coma_hf"


def main(argv: list[str]) -> None:
    if argv[0] == "--reload":
        check_reload(Path(argv[1]), Path(argv[2]))
        return
    check_installed(Path(argv[0]))
    with tempfile.TemporaryDirectory() as scratch:
        folder, vectors = Path(scratch) / "tiny", Path(scratch) / "vectors.pt"
        save_tiny_checkpoint(folder, vectors)
        subprocess.run([sys.executable, __file__, "--reload", str(folder), str(vectors)], check=True)
    print("The installed wheel ships its model-card template and resources; its checkpoint reloads the same")


if __name__ == "__main__":
    main(sys.argv[1:])
