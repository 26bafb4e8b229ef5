"""`benchmarks/gpu_suite.py` at the tiny shape on the CPU (`--cpu_smoke`), as the GPU machine's stack would run it:
without trl and datasets (blocked here), every section written, flex's gradients checked before anything is timed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"
# trl and datasets are not on the GPU machine's stack: importing either fails here as it would there
WITHOUT_TRL_AND_DATASETS = textwrap.dedent(
    """
    import runpy, sys
    sys.modules["trl"] = None
    sys.modules["datasets"] = None
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.mark.slow
def test_the_gpu_suite_runs_every_section_without_trl_or_datasets(tmp_path):
    output = tmp_path / "gpu_suite.json"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRL_AND_DATASETS, str(SUITE), "--cpu_smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(output.read_text())
    flex = record["flex_gradients"]  # on the CPU the losses only: torch has no flex backward there
    assert flex["agree"] and flex["loss_relative"] < 1e-5 and flex["gradient_cosine"] is None
    assert set(record["encode"]["batch 2"]["configurations"]) == {
        "coma_fast",
        "coma_stock",
        "vlm2vec_stock",
        "coma_flex",
    }
    stage1 = record["stage1"]
    assert {name.split(" ", 1)[1] for name in stage1} == {"sdpa", "stock causal"}  # flex trains on a GPU only
    assert all(row["seconds_per_step"] > 0 for row in stage1.values())
    assert record["stage2"]["batch"] == 4 and record["stage2"]["seconds_per_step"] > 0
