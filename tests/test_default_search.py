"""`benchmarks/default_search.py`: open-corpus search metrics over synthetic scenes, checked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from coma_hf.data.synthetic import write_synthetic_dataset

from utils import tiny_coma

PATH = Path(__file__).parents[1] / "benchmarks" / "default_search.py"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("default_search_script", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(objects: list[dict]) -> dict:
    return {"objects": objects}


def test_queries_ask_what_scenes_hold_and_precision_counts_the_top(search):
    red_circle = {"kind": "shape", "colour": "red", "shape": "circle"}
    blue_star = {"kind": "shape", "colour": "blue", "shape": "star"}
    seven = {"kind": "text", "colour": "green", "text": "7"}
    facts = [
        search.scene_facts(_record(objects)) for objects in ([red_circle, seven], [blue_star], [red_circle, blue_star])
    ]
    queries = search.attribute_queries(facts)
    assert queries["colour shape"] == {"a blue star": [False, True, True], "a red circle": [True, False, True]}
    assert queries["count"] == {"one shape": [True, True, False], "two shapes": [False, False, True]}
    assert queries["digit"] == {"the number 7": [True, False, False]}
    scores = torch.tensor([0.1, 0.9, 0.5])  # ranks scene 1, then 2, then 0
    assert search.precision_at(scores, [False, True, True], k=2) == 1.0
    assert search.precision_at(scores, [True, False, False], k=2) == 0.0


def test_the_benchmark_scores_a_checkpoint_over_a_split(search, tmp_path):
    write_synthetic_dataset(tmp_path / "scenes", num_train=1, num_dev=1, num_test=10, image_size=56)
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "search.json"
    search.main(
        [
            "--checkpoints",
            str(tmp_path / "model"),
            "--synthetic_dir",
            str(tmp_path / "scenes"),
            "--output",
            str(output),
        ]
    )
    results = json.loads(output.read_text())["results"]
    assert [result["rendering"] for result in results] == ["demo", "as_trained"]
    result = results[0]
    assert result["scenes"] == 10 and result["chance_p_at_1"] == 0.1
    assert 0 <= result["caption_p_at_1"] <= result["caption_r_at_5"] <= 1
    colour_shape = result["colour shape"]
    assert colour_shape["queries"] == len(colour_shape["per_query"]) > 0
    assert 0 < colour_shape["base_rate"] <= 1
