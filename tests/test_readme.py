"""The README as a newcomer reads it: its quickstart blocks (the Python blocks after `<!-- quickstart -->`) run as
written against a tiny checkpoint, and every relative link of the README and `docs/` resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
QUICKSTART = re.compile(r"<!-- quickstart -->\s*```python\n(.*?)```", re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MODEL = "outputs/stage2"  # the checkpoint the quickstart names


def quickstart_blocks() -> list[str]:
    return QUICKSTART.findall((ROOT / "README.md").read_text())


def test_the_readme_has_a_quickstart_for_automodel_and_sentence_transformers():
    blocks = quickstart_blocks()
    assert len(blocks) == 2
    assert "AutoModel.from_pretrained" in blocks[0] and "SentenceTransformer(" in blocks[1]
    assert all(README_MODEL in block and len(block.splitlines()) <= 12 for block in blocks)
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("index", [0, 1])
def test_each_quickstart_block_runs_as_written(index, tmp_path_factory, monkeypatch, capsys):
    from coma_hf.hub import save_checkpoint
    from coma_hf.tiny import build_tiny_coma

    root = tmp_path_factory.getbasetemp() / "readme"
    if not (root / README_MODEL / "config.json").is_file():
        model, _ = build_tiny_coma(num_compression_tokens=4, seed=0)
        save_checkpoint(model, root / README_MODEL)
    monkeypatch.chdir(root)  # the block names the checkpoint by the relative path the training commands write
    exec(compile(quickstart_blocks()[index], f"README quickstart {index + 1}", "exec"), {})
    printed = capsys.readouterr().out
    numbers = [float(value) for value in re.findall(r"-?\d+\.\d+", printed)]
    assert len(numbers) == 2 and all(-1.0001 <= value <= 1.0001 for value in numbers)  # one query, two documents


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
