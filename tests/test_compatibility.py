"""Checkpoints saved by earlier versions keep loading and give the vectors they gave then.

`tests/fixtures/coma_v0_stage2` is a tiny stage-2 checkpoint saved by coma_hf 0.1.0 with its own remote code, an input
image and that version's vectors (`tests/fixtures/make_v0_checkpoint.py` wrote it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "coma_v0_stage2"
TEXT = "a red circle left of a blue square"
QUESTION = "What colour is the circle?"

# A fresh interpreter in which `import coma_hf` fails: the checkpoint's own remote code, through AutoModel and
# SentenceTransformer.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["coma_hf"] = None
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    folder, text, question, output = sys.argv[1:5]
    image = folder + "/input.png"
    mixed = [{"image": image}, text, {"image": image, "text": question}]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    encode = lambda **kwargs: st.encode(mixed, convert_to_tensor=True, **kwargs).float().contiguous()
    save_file({
        "auto_encode": model.encode(mixed), "auto_query": model.encode_query(mixed),
        "auto_document": model.encode_document(mixed), "st_encode": encode(),
        "st_query": encode(prompt_name="query"), "st_document": encode(prompt_name="document"),
    }, output)
    """
)


def _copy(tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE, folder)
    return folder


@pytest.mark.slow
def test_old_checkpoint_gives_its_vectors_through_its_remote_code(tmp_path):
    folder = _copy(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), TEXT, QUESTION, str(tmp_path / "out.safetensors")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got, expected = (
        load_file(str(tmp_path / "out.safetensors")),
        load_file(str(FIXTURE / "expected_vectors.safetensors")),
    )
    for path in ("auto", "st"):
        for name, stored in (("encode", "encode"), ("query", "encode_query"), ("document", "encode_document")):
            torch.testing.assert_close(got[f"{path}_{name}"], expected[stored], atol=1e-5, rtol=0)


def test_old_checkpoint_gives_its_vectors_through_the_installed_package(tmp_path):
    from coma_hf import CoMaModel

    folder = _copy(tmp_path)
    model = CoMaModel.from_pretrained(folder).eval()
    assert type(model).__module__.startswith("coma_hf.")  # the package's class, not the checkpoint's copy
    image = str(folder / "input.png")
    mixed = [{"image": image}, TEXT, {"image": image, "text": QUESTION}]
    expected = load_file(str(FIXTURE / "expected_vectors.safetensors"))
    torch.testing.assert_close(model.encode(mixed), expected["encode"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_query(mixed), expected["encode_query"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_document(mixed), expected["encode_document"], atol=1e-5, rtol=0)
    assert not torch.allclose(expected["encode_query"], expected["encode_document"], atol=1e-3)  # not vacuous
