"""examples/app.py, the Gradio demo, started in a subprocess with a tiny two-stage checkpoint and a few synthetic
scenes: through `gradio_client` the search equals a direct ranking with `encode` and cosine similarity, the ask tab
returns what `generate_from_compression` returns (and the stock class with the image in view), bad input gives its
message; the folder cache (keys, resume); headless Chromium loads the page, searches, asks, and makes no request
outside 127.0.0.1.

Skipped without gradio / gradio_client (and selenium and Debian's chromium for the browser test); with
COMA_REQUIRE_DEMO_TESTS=1 (CI's demo step) a missing one fails instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coma_hf import inference

from app_helpers import RunningApp, outside_requests, require_browser, require_modules, save_screenshots
from utils import TINY_MODEL_ARGS, command_line, load_example

require_modules("gradio", "gradio_client")
pytestmark = pytest.mark.slow  # subprocesses and a short two-stage training run

QUERY = "a red circle"
QUESTION = "What colour is the circle?"
NUM_SCENES = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage-1 checkpoint, the stage-2 checkpoint trained from it, and a folder of synthetic scenes plus one
    file that is not an image."""
    root = tmp_path_factory.mktemp("demo")
    synthetic = root / "synthetic"
    load_example("pretrain").main(
        TINY_MODEL_ARGS
        + command_line(
            "--num_train_scenes 8 --num_dev_scenes 4 --num_test_scenes 2 --scene_size 56 --max_steps 1"
            " --per_device_train_batch_size 4 --max_eval_samples 2 --dataloader_num_workers 0 --report_to none",
            output_dir=root / "stage1",
            synthetic_dir=synthetic,
        )
    )
    load_example("train_contrastive").main(
        command_line(
            "--recipe tiny --max_steps 2 --per_device_train_batch_size 8 --per_device_eval_batch_size 16"
            " --dataloader_num_workers 0 --cached false --report_to none --max_train_scenes 8",
            model_name_or_path=root / "stage1",
            synthetic_dir=synthetic,
            output_dir=root / "stage2",
        )
    )
    scenes = root / "scenes"
    scenes.mkdir()
    for source in sorted((synthetic / "images").glob("*.png"))[:NUM_SCENES]:
        shutil.copy(source, scenes / source.name)
    (scenes / "notes.png").write_text("not an image")
    return {"root": root, "stage1": root / "stage1", "stage2": root / "stage2", "scenes": scenes}


@pytest.fixture(scope="module")
def apps(trained):
    """The demo over the scenes, and one over an empty folder (both started at once)."""
    root = trained["root"]
    (root / "empty").mkdir()
    common = ["--model_name_or_path", str(trained["stage2"]), "--batch_size", "4"]
    running = {
        "main": RunningApp(
            common + ["--images", str(trained["scenes"]), "--cache_dir", str(root / "cache")], root, root / "app.log"
        ),
        "empty": RunningApp(
            common + ["--images", str(root / "empty"), "--cache_dir", str(root / "cache-empty")], root, root / "e.log"
        ),
    }
    try:
        yield {name: app.wait() for name, app in running.items()}
    finally:
        for app in running.values():
            app.stop()


@pytest.fixture(scope="module")
def client(apps):
    from gradio_client import Client

    return Client(apps["main"].url, verbose=False)


@pytest.fixture(scope="module")
def models(trained):
    from transformers import AutoModel

    return {
        stage: AutoModel.from_pretrained(trained[stage], trust_remote_code=True).eval()
        for stage in ("stage1", "stage2")
    }


def _direct_ranking(model, scenes: Path, query: dict) -> list[tuple[str, float]]:
    """Every readable scene ranked by cosine similarity to `query`, embedded one by one with `encode`."""
    names = sorted(path.name for path in scenes.glob("*.png") if path.name != "notes.png")
    documents = model.encode_document([{"image": str(scenes / name)} for name in names], batch_size=1)
    scores = (model.encode_query([query]) @ documents.T)[0]
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    return [(names[index], float(scores[index])) for index in order]


def _search(client, text: str = "", image: Path | None = None, top_k: int = 50):
    from gradio_client import handle_file

    gallery, table, status = client.predict(
        text, handle_file(str(image)) if image else None, top_k, api_name="/search"
    )
    return gallery, [(row[1], row[2]) for row in table["data"]], status


def _assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (name, score), (_, reference) in zip(got, expected, strict=True):
        assert abs(score - reference) <= 1e-5, (name, score, reference)


def test_search_equals_a_direct_ranking_by_cosine_similarity(client, trained, models):
    scenes = trained["scenes"]
    probe = sorted(scenes.glob("*.png"))[1]
    for text, image, query in (
        (QUERY, None, {"text": QUERY}),
        ("", probe, {"image": str(probe)}),
        (QUERY, probe, {"text": QUERY, "image": str(probe)}),
    ):
        gallery, ranking, status = _search(client, text, image)
        _assert_same_ranking(ranking, _direct_ranking(models["stage2"], scenes, query))
        assert [item["caption"].split()[1] for item in gallery] == [name for name, _ in ranking]
        assert f"{NUM_SCENES} images" in status and "1 unreadable file left out" in status
    _, top, _ = _search(client, QUERY, top_k=3)
    _assert_same_ranking(top, _direct_ranking(models["stage2"], scenes, {"text": QUERY})[:3])


def test_the_folder_is_embedded_once_into_the_cache(client, trained):
    cache = trained["root"] / "cache"
    entries = [path for path in cache.iterdir() if path.is_dir()]
    assert len(entries) == 1  # every search so far reused the first one
    manifest = json.loads((entries[0] / "manifest.json").read_text())
    assert manifest["embedded"] == NUM_SCENES and [row["id"] for row in manifest["skipped_rows"]] == ["notes.png"]


def test_ask_answers_from_the_k_states_and_with_the_image_in_view(client, trained, models):
    from gradio_client import handle_file

    from coma_hf.backbones import get_family
    from coma_hf.evaluation.compression import MAX_ANSWER_TOKENS
    from coma_hf.inputs import load_image
    from coma_hf.processing_coma import BackboneProcessorParts
    from coma_hf.reader import generate_answers, question_prompts, reader_processor

    image_path = sorted(trained["scenes"].glob("*.png"))[0]
    tokens, from_states, visible = client.predict(handle_file(str(image_path)), None, QUESTION, api_name="/ask")
    picked = client.predict(None, image_path.name, QUESTION, api_name="/ask")
    assert picked == (tokens, from_states, visible)

    generator = models["stage1"]  # the stage-1 checkpoint stage 2 was trained from, as its run record says
    image = load_image(image_path)
    inputs = generator.processor.process_compression_inputs([{"image": image, "text": None}])
    compression = generator.compress(**inputs)
    assert from_states == generator.generate_from_compression(compression, [QUESTION], MAX_ANSWER_TOKENS)[0]
    k = generator.config.num_compression_tokens
    assert f"**{inputs['input_ids'].shape[1] - k} tokens**" in tokens and f"K = {k} states" in tokens

    # with the image in view: the stock class loaded from the same checkpoint, rendered as the reader is
    stock = get_family(generator.config.backbone_config.model_type).generation_class.from_pretrained(
        trained["stage1"], config=generator.config.backbone_config
    )
    parts = generator.processor
    processor = reader_processor(
        BackboneProcessorParts(parts.tokenizer, parts.image_processor, parts.chat_template),
        compress_instruction=parts.compress_instruction,
    )
    record = {"image": image, "text": None, "conversation": [{"question": QUESTION, "answer": ""}]}
    prompt = question_prompts(processor, [record])[0][0]
    assert visible == generate_answers(stock.eval(), processor, [prompt], MAX_ANSWER_TOKENS)[0]


def _error_of(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        call()
    return str(raised.value)


def test_bad_input_gives_a_message(client, apps, trained, tmp_path):
    from gradio_client import Client, handle_file

    broken = tmp_path / "photo.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    message = _error_of(lambda: client.predict("", handle_file(str(broken)), 5, api_name="/search"))
    assert "query image photo.jpg could not be read as an image" in message
    assert "Type a text query" in _error_of(lambda: client.predict("  ", None, 5, api_name="/search"))
    message = _error_of(lambda: client.predict(handle_file(str(broken)), None, QUESTION, api_name="/ask"))
    assert "uploaded image photo.jpg could not be read as an image" in message
    assert "Upload an image or pick one" in _error_of(lambda: client.predict(None, None, QUESTION, api_name="/ask"))
    message = _error_of(lambda: client.predict(None, "notes.png", QUESTION, api_name="/ask"))
    assert "picked image notes.png could not be read as an image" in message
    picked = sorted(path.name for path in trained["scenes"].glob("*.png"))[0]
    assert "Type a question" in _error_of(lambda: client.predict(None, picked, " ", api_name="/ask"))
    empty = Client(apps["empty"].url, verbose=False)
    assert "No images in" in _error_of(lambda: empty.predict(QUERY, None, 5, api_name="/search"))
    for app in apps.values():
        assert "Traceback" not in app.output()  # bad input is reported, not raised


def test_cache_key_follows_weights_and_listing_and_an_interrupted_encode_resumes(trained, models, tmp_path):
    app = load_example("app")
    folder = tmp_path / "scenes"
    shutil.copytree(trained["scenes"], folder)
    names = [entry[0] for entry in inference.folder_listing(folder)]  # 6 scenes and notes.png, in corpus order
    model, cache = models["stage2"], tmp_path / "cache"

    class Interrupted(Exception):
        pass

    class Flaky:
        """The model, but encoding stops after `limit` calls (a killed run); records the images it was given."""

        def __init__(self, limit: int):
            self.limit, self.calls, self.images = limit, 0, []

        def __getattr__(self, name):
            return getattr(model, name)

        def encode(self, inputs, **kwargs):
            self.calls += 1
            if self.calls > self.limit:
                raise Interrupted
            self.images += [Path(item["image"]).name for item in inputs]
            return model.encode(inputs, **kwargs)

    def search(search_model, progress=None) -> tuple[list, dict]:
        found = app.FolderSearch(search_model, folder, cache, "matrix", batch_size=2, shard_size=2)
        return found.search(QUERY, None, 10, progress)

    with pytest.raises(Interrupted):
        search(Flaky(limit=2))  # two shards of two scenes written, then killed
    (entry,) = cache.iterdir()
    assert len(inference.finished_shards(entry)) == 2 and not (entry / "manifest.json").exists()
    resumed = Flaky(limit=100)
    hits, manifest = search(resumed)
    assert set(resumed.images) == set(names[4:])  # only the rows after the finished shards
    _assert_same_ranking(hits, _direct_ranking(model, folder, {"text": QUERY}))
    assert manifest["embedded"] == NUM_SCENES and manifest["skipped"] == 1

    assert search(Flaky(limit=0))[0] == hits  # a finished entry is read, not embedded again
    shutil.copy(folder / names[0], folder / "new.png")  # a new file: a new entry
    shown = []  # what Gradio's progress bar is given: (images done, of how many)
    bar = app.ProgressBar(lambda value, desc, unit: shown.append(value), "embedding")
    assert search(Flaky(limit=100), bar)[1]["embedded"] == NUM_SCENES + 1 and len(list(cache.iterdir())) == 2
    assert shown == [(2, 8), (4, 8), (6, 8), (8, 8)]  # batches of two over 8 files (notes.png among them)
    search(models["stage1"])  # other weights: another entry
    assert len(list(cache.iterdir())) == 3


def test_the_stage1_checkpoint_comes_from_the_run_record(trained, models, tmp_path):
    app = load_example("app")
    stage1, stage2 = str(trained["stage1"]), str(trained["stage2"])
    assert app.generator_of(stage2)[0] == stage1
    assert app.generator_of(stage1)[0] == stage1  # no stage-2 record: itself
    assert app.changed_since_training(stage2, models["stage1"], stage1) is None  # the weights stage 2 started from
    moved = tmp_path / "stage2"
    shutil.copytree(trained["stage2"], moved)
    record = json.loads((moved / "contrastive_summary.json").read_text())
    (moved / "contrastive_summary.json").write_text(json.dumps({**record, "start_weights": "0" * 64}))
    assert "has been retrained since" in app.changed_since_training(str(moved), models["stage1"], stage1)
    (moved / "contrastive_summary.json").write_text('{"started_from": "gone/stage1"}')
    generator, why = app.generator_of(str(moved))
    assert generator == str(moved) and "gone/stage1" in why


def test_missing_defaults_say_which_command_makes_them(tmp_path):
    import subprocess
    import sys

    def start() -> str:
        app = Path(__file__).parents[1] / "examples" / "app.py"
        result = subprocess.run([sys.executable, str(app)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        return result.stderr

    assert "No checkpoint at outputs/stage2: make the default runs with `python examples/pretrain.py && " in start()
    (tmp_path / "outputs" / "stage2").mkdir(parents=True)
    (tmp_path / "outputs" / "stage2" / "config.json").write_text('{"model_type": "coma"}')
    assert "No synthetic test scenes at outputs/synthetic: `python examples/pretrain.py` writes them" in start()


def test_by_default_the_synthetic_test_scenes_are_searched(tmp_path, monkeypatch):
    from coma_hf.data.synthetic import write_synthetic_dataset

    app = load_example("app")
    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset(app.DEFAULT_SYNTHETIC, num_train=2, num_dev=1, num_test=3, image_size=32)
    (Path(app.DEFAULT_SCENES).mkdir(parents=True))
    (Path(app.DEFAULT_SCENES) / "test-999999.png").write_text("left from an earlier, larger test split")
    folder = app.image_folder(None)
    tests = sorted(Path(app.DEFAULT_SYNTHETIC, "images").glob("test-*.png"))
    assert sorted(path.name for path in folder.iterdir()) == [path.name for path in tests]
    assert all((folder / path.name).samefile(path) for path in tests)  # linked, not copied
    shutil.rmtree(app.DEFAULT_SYNTHETIC)  # the scenes written anew: new files, linked again
    write_synthetic_dataset(app.DEFAULT_SYNTHETIC, num_train=2, num_dev=1, num_test=3, image_size=32)
    assert all((app.image_folder(None) / path.name).samefile(path) for path in tests)


def test_the_page_in_headless_chromium(apps, client, trained, tmp_path):
    from urllib.parse import unquote

    from gradio_client import handle_file

    require_browser()
    image = sorted(trained["scenes"].glob("*.png"))[0]
    seen = save_screenshots(apps["main"].url, QUERY, image, QUESTION, tmp_path)
    # the page shows what the API returns for the same query: the default 8 results (of 6 readable scenes), in order
    _, ranking, _ = _search(client, QUERY, top_k=8)
    assert [unquote(source).rsplit("/", 1)[-1] for source in seen["gallery"]] == [name for name, _ in ranking]
    assert len(ranking) == NUM_SCENES
    assert seen["answers"] == client.predict(handle_file(str(image)), None, QUESTION, api_name="/ask")[1:]
    assert (tmp_path / "demo_search.png").stat().st_size > 10_000 and (tmp_path / "demo_ask.png").is_file()
    assert any(url.startswith(apps["main"].url) for url in seen["urls"])
    assert outside_requests(seen["urls"]) == []  # fonts, scripts, analytics: nothing left the machine


def _demo_load():
    """benchmarks/demo_load.py, whose load the test runs for correctness (the benchmark reports its speed)."""
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "benchmarks" / "demo_load.py"
    spec = importlib.util.spec_from_file_location("demo_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_sixteen_concurrent_clients_get_what_each_request_gets_alone(trained):
    load = _demo_load()
    root = trained["root"]
    arguments = ["--model_name_or_path", str(trained["stage2"]), "--images", str(trained["scenes"])]
    arguments += ["--generator_name_or_path", str(trained["stage2"])]  # asked to answer, which it was never trained to
    log = root / "concurrent.log"
    app = RunningApp(arguments + ["--cache_dir", str(root / "cache-concurrent"), "--concurrency", "4"], root, log)
    try:
        images = sorted(path for path in trained["scenes"].glob("*.png") if path.name != "notes.png")
        plan = load.request_plan(load.request_pool(images), clients=16, per_client=8)
        assert {request.api for client in plan for request in client} == {"/search", "/ask"}
        result = load.check_load(app.wait().url, plan)
    finally:
        app.stop()
    assert result["requests"] == 128 and result["distinct_requests"] > 10
    assert result["errors"] == [] and result["mismatches"] == []
    assert result["healthy_after"]
    assert load.embed_count(log) == 1  # sixteen first searches at once: one embedded the folder, the others waited
    assert "Traceback" not in log.read_text()
    assert f"The ask tab: {trained['stage2']} is a stage-2 (contrastive) checkpoint" in log.read_text()


def test_concurrent_first_searches_embed_the_folder_once(trained, models, tmp_path):
    import threading

    app = load_example("app")
    model, calls = models["stage2"], []

    class Slow:
        """The model, but each encode call is recorded and takes a while (first searches overlap)."""

        def __getattr__(self, name):
            return getattr(model, name)

        def encode(self, inputs, **kwargs):
            calls.append(len(inputs))
            threading.Event().wait(0.2)
            return model.encode(inputs, **kwargs)

    search = app.FolderSearch(Slow(), trained["scenes"], tmp_path / "cache", "matrix", batch_size=64)
    results, start = [], threading.Barrier(8)

    def first_search() -> None:
        start.wait()
        results.append(search.search(QUERY, None, 10)[0])

    threads = [threading.Thread(target=first_search) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(result == results[0] for result in results)
    concurrent, calls[:] = list(calls), []
    app.FolderSearch(Slow(), trained["scenes"], tmp_path / "alone", "matrix", batch_size=64).search(QUERY, None, 10)
    assert concurrent == calls and calls  # the encode calls of one search alone: the folder was embedded once
    _assert_same_ranking(results[0], _direct_ranking(model, trained["scenes"], {"text": QUERY}))
