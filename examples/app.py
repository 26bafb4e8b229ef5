"""A Gradio demo of a CoMa model: search a folder of images, and ask the compression what it kept.

    pip install -e ".[demo]"
    python examples/app.py          # the default runs' checkpoints and the synthetic test scenes
    python examples/app.py --model_name_or_path CKPT --images DIR [--generator_name_or_path STAGE1] [--port 7860]

* `--concurrency N` (default 1): requests the model serves at once; the rest wait in Gradio's queue.
* Search (CKPT): a text query, an image query, or both; the top-k images of DIR as a gallery with cosine scores. The
  folder is embedded on first use (a progress bar) into `encode_corpus` shards cached under `--cache_dir`, keyed on the
  checkpoint's weights, its processor settings and the folder's listing (retraining or a new file gives a new key; an
  interrupted encode resumes from its finished shards; a cached shard, manifest or index that storage damaged is
  found when the entry is first used and redone, with a warning); a faiss index when faiss is installed, else a matrix
  product.
* Ask the compression (STAGE1: by default the stage-1 checkpoint CKPT was trained from, when its run record names
  one, else CKPT): upload an image or pick one from DIR; the page shows how many tokens the input is and that K remain,
  and answers each question twice — by `generate_from_compression` from the K compression states alone, and by the
  same weights reading the whole input, image in view (the stock model class, as the reader is checked).

It binds 127.0.0.1 and works offline: Gradio's analytics are off, the theme uses system fonts (Gradio themes can name
Google fonts), and nothing is downloaded unless `--model_name_or_path` or `--generator_name_or_path` names a Hub id.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coma_hf import cli
from coma_hf.constants_coma import BatchKey
from coma_hf.data.sources import IMAGE_EXTENSIONS, read_jsonl_records
from coma_hf.evaluation.compression import MAX_ANSWER_TOKENS
from coma_hf.hub.card import CONTRASTIVE_SUMMARY, PRETRAIN_SUMMARY, read_json_file
from coma_hf.inference import (
    build_faiss_index,
    corpus_cache_key,
    encode_corpus,
    folder_listing,
    image_folder_rows,
    load_embeddings,
    load_faiss_index,
    search_embeddings,
    search_loaded_index,
    verified_manifest,
    write_manifest,
)
from coma_hf.inference.index import LANCEDB_FOLDER
from coma_hf.inputs import CoMaInputError, load_image
from coma_hf.processing_coma import BackboneProcessorParts
from coma_hf.reader import generate_answers, question_prompts, reader_processor

logger = logging.getLogger("app")

# The default runs' outputs, as examples/pretrain.py and examples/train_contrastive.py name them by default
DEFAULT_MODEL = cli.DEFAULT_STAGE2
DEFAULT_SYNTHETIC = cli.DEFAULT_SYNTHETIC
DEFAULT_SCENES = "outputs/demo/test_scenes"  # the synthetic test scenes, linked here on first start
DEFAULT_CACHE = "outputs/demo/cache"
SHARD_SIZE = 256  # rows per cached shard: how much an interrupted encode can lose
PICK_LIMIT = 1000  # folder images offered in the ask tab's list (upload any other)
INDEXES = ("auto", "faiss", "matrix", "lancedb")
MAX_CONCURRENCY = 64  # Gradio's worker threads: more requests at once only queue inside the model


class DemoError(ValueError):
    """Bad input to the demo, with the message the page shows."""


# --------------------------------------------------------------------------------------------------------------------
# What to load
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path", default=DEFAULT_MODEL, help="CoMa checkpoint that searches (folder or Hub id)."
    )
    parser.add_argument(
        "--images", help=f"Folder of images to search (default: the synthetic test scenes of {DEFAULT_SYNTHETIC})."
    )
    parser.add_argument(
        "--generator_name_or_path",
        help="CoMa checkpoint the ask tab uses (default: the stage-1 checkpoint the searching one was trained from, "
        "when its contrastive_summary.json names one, else the searching one).",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (0.0.0.0 exposes the demo).")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE, help="Where embedded folders are cached.")
    parser.add_argument(
        "--index",
        choices=INDEXES,
        default="auto",
        help="faiss, a plain matrix product, a LanceDB table beside the cached shards, or faiss when installed.",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images embedded at once.")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="Requests the model serves at once; more wait in Gradio's queue (above 1 pays on a GPU, not on a CPU).",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    cli.batch_size(args.batch_size, "--batch_size")
    cli.count(args.concurrency, "--concurrency", maximum=MAX_CONCURRENCY, what="number of requests")
    return args


def check_checkpoint(path: str, option: str) -> dict | None:
    """The config of the CoMa checkpoint `path` (`None`: a Hub id only the Hub knows); stops with one line when it is
    none (`coma_hf.cli.coma_checkpoint`), and a missing default says how to make it."""
    cli.default_checkpoint_missing(path, option)
    return cli.coma_checkpoint(path, option)


def image_folder(images: str | None) -> Path:
    """The folder to search: `images`, or the synthetic test scenes linked into `DEFAULT_SCENES`."""
    if images is not None:
        return cli.existing_folder(images, "--images", "folder of images")
    scenes = Path(DEFAULT_SYNTHETIC) / "test.jsonl"
    if not scenes.is_file():
        raise SystemExit(
            f"No synthetic test scenes at {DEFAULT_SYNTHETIC}: `python examples/pretrain.py` writes them, "
            "or name a folder with --images"
        )
    return link_files(
        [Path(DEFAULT_SYNTHETIC) / record["image"] for record in read_jsonl_records(scenes)], DEFAULT_SCENES
    )


def link_files(files: list[Path], folder: str | os.PathLike) -> Path:
    """`folder` holding exactly `files`, by name: hard links (copies across file systems), renewed when a source was
    written anew; other files in `folder` are removed."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {source.name for source in files}
    for stale in folder.iterdir():
        if stale.name not in names:
            stale.unlink()
    for source in files:
        target = folder / source.name
        if target.exists() and os.path.samefile(source, target):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return folder


def generator_of(checkpoint: str) -> tuple[str, str]:
    """`(generator, why)`: the stage-1 checkpoint `checkpoint` was trained from when its stage-2 run record names one
    that is here (a folder with a stage-1 run record), else `checkpoint` itself."""
    record = read_json_file(Path(checkpoint) / CONTRASTIVE_SUMMARY) if Path(checkpoint).is_dir() else None
    start = (record or {}).get("started_from")
    if not start:
        return checkpoint, f"{checkpoint} names no stage-1 checkpoint it was trained from: asking it directly"
    if not (Path(start) / PRETRAIN_SUMMARY).is_file():
        return checkpoint, (
            f"{checkpoint} was trained from {start}, which is not a stage-1 checkpoint here (no {PRETRAIN_SUMMARY}): "
            f"asking {checkpoint} itself (name one with --generator_name_or_path)"
        )
    return start, f"the stage-1 checkpoint {checkpoint} was trained from ({CONTRASTIVE_SUMMARY})"


def changed_since_training(checkpoint: str, generator, generator_path: str) -> str | None:
    """A warning when the generator is the stage-1 checkpoint named in `checkpoint`'s record but its weights are not
    the ones that run started from (it was retrained since)."""
    from coma_hf.training import weights_fingerprint

    record = read_json_file(Path(checkpoint) / CONTRASTIVE_SUMMARY) or {}
    recorded = record.get("start_weights")
    if record.get("started_from") != generator_path or not recorded or weights_fingerprint(generator) == recorded:
        return None
    return f"{generator_path} has been retrained since {checkpoint} was trained from it: its weights are newer."


def load_coma(path: str, device: str):
    """A CoMa checkpoint through `AutoModel` (its remote code), in eval mode on `device`."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, trust_remote_code=True).to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------------------------
class FolderSearch:
    """Searches the images of `folder` with `model`: the folder is embedded once per cache key (see
    `coma_hf.inference.corpus_cache_key`) into `encode_corpus` shards under `cache_root`, then queried through faiss
    (`index="faiss"`), a matrix product (`"matrix"`) or a LanceDB table in the entry (`"lancedb"`, with each file's
    path, size and modification time)."""

    def __init__(
        self,
        model,
        folder: str | os.PathLike,
        cache_root: str | os.PathLike,
        index: str,
        batch_size: int = 32,
        shard_size: int = SHARD_SIZE,
    ):
        self.model, self.folder, self.cache_root = model, Path(folder), Path(cache_root)
        self.index, self.batch_size, self.shard_size = index, batch_size, shard_size
        self._weights: str | None = None  # the model's fingerprint, computed on first use
        self._checked: tuple[Path, dict] | None = None  # the last cache entry found whole, and its manifest
        self._loaded: tuple[Path, Any] | None = (
            None  # the last entry read for search: faiss (index, ids) or (ids, vectors)
        )
        self._lock = threading.Lock()  # concurrent first searches: one embeds and loads the folder, the others wait

    @property
    def instruction(self) -> str | None:
        return self.model.processor.document_instruction

    def corpus(self, progress: Any = None) -> tuple[Path, dict, Any]:
        """`(shard folder, manifest, what search reads)` of the folder as it is now, embedding it first when no whole
        cache entry exists (finished shards of an interrupted encode are kept; damaged ones are redone, and a new
        index built), and loading it once per entry: the faiss index and its ids, or the ids and the vectors.
        `progress`: a tqdm-like object or `None`."""
        try:
            listing = folder_listing(self.folder)
        except OSError as error:  # the folder went away or cannot be read while the demo runs
            raise DemoError(f"Cannot read the image folder {self.folder}: {error.strerror or error}") from error
        if not listing:
            raise DemoError(f"No images in {self.folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        with self._lock:
            output = self.cache_root / corpus_cache_key(self._fingerprint(), listing, **self._settings())[:32]
            manifest = self._whole_manifest(output) or self._embed(listing, output, progress)
            if not manifest["embedded"]:
                reasons = "; ".join(f"{row['id']}: {row['error']}" for row in manifest["skipped_rows"][:3])
                raise DemoError(f"None of the {manifest['rows']} files in {self.folder} could be read ({reasons})")
            if self._loaded is None or self._loaded[0] != output:
                # a missing or damaged index is (re)built here, by one thread
                self._loaded = (output, self._load(output))
            return output, manifest, self._loaded[1]

    def _load(self, output: Path) -> Any:
        """What search reads from a cache entry: the faiss index and its ids, the LanceDB folder (synced with the
        shards), or the ids and the vectors."""
        if self.index == "faiss":
            return load_faiss_index(output)
        if self.index == "lancedb":
            from coma_hf.inference.lancedb_store import listing_columns, sync_lancedb

            sync_lancedb(output, output / LANCEDB_FOLDER, columns=listing_columns(self.folder))
            return (output / LANCEDB_FOLDER,)
        return load_embeddings(output)

    def _fingerprint(self) -> str:
        """The model's weights fingerprint, computed on first use."""
        if self._weights is None:
            from coma_hf.training import weights_fingerprint

            self._weights = weights_fingerprint(self.model)
        return self._weights

    def _settings(self) -> dict:
        """Besides the weights, everything the vectors depend on."""
        return {
            "processor": self.model.processor.to_json_string(),
            "config": self.model.config.to_json_string(),
            "instruction": self.instruction,
            "dtype": str(self.model.dtype),
            "device": str(self.model.device),
        }

    def _embed(self, listing: list, output: Path, progress: Any) -> dict:
        """Embed the folder into the cache entry `output` (resuming its finished shards); its manifest."""
        logger.info("Embedding %d files of %s into %s", len(listing), self.folder, output)
        self._loaded = None
        if progress is not None:
            progress.total = len(listing)
        with torch.inference_mode():
            encode_corpus(
                self.model,
                image_folder_rows(self.folder),
                output,
                shard_size=self.shard_size,
                batch_size=self.batch_size,
                instruction=self.instruction,
                progress=progress,
            )
        manifest = write_manifest(output, folder=str(self.folder), instruction=self.instruction)
        if self.index == "faiss" and manifest["embedded"]:
            build_faiss_index(output)  # anew: an index left from before may predate a redone shard
        self._checked = (output, manifest)
        return manifest

    def _whole_manifest(self, output: Path) -> dict | None:
        """The manifest of the cache entry `output` when it and its shards are whole (`verified_manifest`), else
        `None`. Checked once per entry: hashing every shard on each search would cost more than the search, and an
        index found damaged is rebuilt when the entry is loaded for search (`load_faiss_index`)."""
        if self._checked is None or self._checked[0] != output:
            manifest = verified_manifest(output)
            self._checked = (output, manifest) if manifest is not None else None
        return self._checked[1] if self._checked is not None else None

    def search(self, text: str | None, image: Any, top_k: int, progress: Any = None) -> tuple[list, dict]:
        """`([(id, cosine score)] best first, manifest)` for a query of `text`, `image` (decoded) or both."""
        query = {}
        if text and text.strip():
            query["text"] = text.strip()
        if image is not None:
            query["image"] = image
        if not query:
            raise DemoError("Type a text query, add a query image, or both")
        _, manifest, loaded = self.corpus(progress)
        vectors = self.model.encode_query([query])
        if self.index == "lancedb":
            from coma_hf.inference.lancedb_store import search_lancedb

            search = search_lancedb
        else:
            search = search_loaded_index if self.index == "faiss" else search_embeddings
        return search(*loaded, vectors, top_k)[0], manifest


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


# --------------------------------------------------------------------------------------------------------------------
# Ask the compression
# --------------------------------------------------------------------------------------------------------------------
def stock_view(model):
    """The stock family class (`...ForConditionalGeneration`) over `model`'s own modules, no copy: what the CoMa
    weights answer when they read the whole input. CoMa keeps the stock attribute names (`model`, `lm_head`), so
    this is the model `generation_class.from_pretrained(checkpoint, config=backbone_config)` loads."""
    from coma_hf.backbones import get_family

    config = model.config.backbone_config
    with torch.device("meta"):  # every parameter is replaced by the CoMa model's own below
        stock = get_family(config.model_type).generation_class(config)
    stock.model, stock.lm_head = model.model, model.lm_head
    return stock.eval()


class CompressionAsker:
    """Questions about one image, answered from its K compression states alone and with the image in view."""

    def __init__(self, model, max_new_tokens: int = MAX_ANSWER_TOKENS):
        if model.config.num_compression_tokens == 0:
            raise SystemExit("The ask tab needs a checkpoint with compression tokens (this one has K = 0)")
        self.model, self.max_new_tokens = model, max_new_tokens
        self.stock = stock_view(model)
        processor = model.processor
        parts = BackboneProcessorParts(processor.tokenizer, processor.image_processor, processor.chat_template)
        # the reader's renderer: stage 1's layout with no compression tokens, the same image bounds
        self.visible_processor = reader_processor(parts, compress_instruction=processor.compress_instruction)

    @property
    def num_compression_tokens(self) -> int:
        return self.model.config.num_compression_tokens

    def inputs(self, image) -> Any:
        """The stage-1 input of `image` (a decoded PIL image), ending with the K compression tokens."""
        return self.model.processor.process_compression_inputs([{"image": image, "text": None}])

    def token_counts(self, image) -> tuple[int, int]:
        """`(input tokens, of which visual)` of `image` before the K compression tokens."""
        batch = self.inputs(image)
        total = batch[BatchKey.INPUT_IDS].shape[1] - self.num_compression_tokens
        return total, int(batch[BatchKey.IMAGE_TOKENS].sum())

    @torch.inference_mode()
    def ask(self, image, question: str) -> tuple[str, str]:
        """`(answer from the K states alone, answer with the image in view)`, both greedy, `max_new_tokens` at most."""
        if not question or not question.strip():
            raise DemoError("Type a question about the image")
        question = question.strip()
        compression = self.model.compress(**self.inputs(image).to(self.model.device))
        from_states = self.model.generate_from_compression(compression, [question], self.max_new_tokens)[0]
        record = {"image": image, "text": None, "conversation": [{"question": question, "answer": ""}]}
        prompt = question_prompts(self.visible_processor, [record])[0][0]
        visible = generate_answers(self.stock, self.visible_processor, [prompt], self.max_new_tokens)[0]
        return from_states, visible


def describe_tokens(total: int, visual: int, num_compression_tokens: int) -> str:
    """The page's line on what the compression keeps."""
    return (
        f"The input is **{total} tokens** ({visual} of them the image's visual tokens, the rest its instruction). "
        f"Stage 1 compresses it into **K = {num_compression_tokens} states**: the first answer is generated from "
        f"those {num_compression_tokens} alone, the second by the same weights reading all {total} tokens."
    )


def read_image(path: str | os.PathLike | None, what: str) -> Any:
    """The decoded image of a file (an upload, a pick), or `None` without one; an unreadable file is a `DemoError`
    naming it."""
    if not path:
        return None
    try:
        return load_image(path, field=what)
    except CoMaInputError as error:
        raise DemoError(f"The {what} {Path(path).name} could not be read as an image: {error.reason}") from error


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------
class ProgressBar:
    """The tqdm-like object `encode_corpus` updates, shown as Gradio's progress bar."""

    def __init__(self, progress: Callable, description: str):
        self.progress, self.description, self.done, self.total = progress, description, 0, None

    def update(self, count: int) -> None:
        self.done += count
        self.progress((self.done, self.total), desc=self.description, unit="images")


def page_error(error: Exception):
    """The `gr.Error` the page shows for bad input (Gradio renders it as HTML: file names are escaped)."""
    import gradio as gr

    return gr.Error(html.escape(str(error), quote=False), print_exception=False)


class PageHandlers:
    """What the page's events call: searches and asks, bad input raised as `gr.Error` (`page_error`)."""

    def __init__(self, search: FolderSearch, asker: CompressionAsker, picks: list[str]):
        self.search, self.asker, self.picks = search, asker, picks

    def run_search(self, text: str, image_path: str | None, top_k: float, progress: Any = None):
        """`(gallery, score table, status line)` of a search."""
        try:
            image = read_image(image_path, "query image")
            bar = ProgressBar(progress, f"Embedding {self.search.folder} (once)") if progress is not None else None
            hits, manifest = self.search.search(text, image, int(top_k), bar)
        except (DemoError, CoMaInputError) as error:
            raise page_error(error) from error
        gallery = [
            (str(self.search.folder / ident), f"{rank}. {ident}  {score:.3f}")
            for rank, (ident, score) in enumerate(hits, 1)
        ]
        table = [[rank, ident, score] for rank, (ident, score) in enumerate(hits, 1)]
        count = manifest["skipped"]
        skipped = f"; {count} unreadable file{'s' if count > 1 else ''} left out" if count else ""
        status = (
            f"{manifest['embedded']} images of `{self.search.folder}` searched ({self.search.index} search{skipped})."
        )
        return gallery, table, status

    def picked_or_uploaded(self, upload: str | None, pick: str | None):
        image = read_image(upload, "uploaded image")
        if image is None and pick:
            if pick not in self.picks:
                raise DemoError(f"{pick} is not one of the images of {self.search.folder}")
            image = read_image(self.search.folder / pick, "picked image")
        if image is None:
            raise DemoError("Upload an image or pick one from the folder")
        return image

    def show_image(self, upload: str | None, pick: str | None):
        """`(image, token line)` of the chosen image."""
        try:
            image = self.picked_or_uploaded(upload, pick)
            counts = self.asker.token_counts(image)
        except (DemoError, CoMaInputError) as error:
            raise page_error(error) from error
        return image, describe_tokens(*counts, self.asker.num_compression_tokens)

    def run_ask(self, upload: str | None, pick: str | None, question: str):
        """`(token line, answer from the K states, answer with the image in view)`."""
        try:
            image = self.picked_or_uploaded(upload, pick)
            from_states, visible = self.asker.ask(image, question)
            counts = self.asker.token_counts(image)
        except (DemoError, CoMaInputError) as error:
            raise page_error(error) from error
        return describe_tokens(*counts, self.asker.num_compression_tokens), from_states, visible


def build_demo(search: FolderSearch, asker: CompressionAsker, notes: list[str], picks: list[str]):
    """The two-tab `gr.Blocks` page. Bad input raises `gr.Error`, which the page shows as a message."""
    import gradio as gr

    handlers = PageHandlers(search, asker, picks)
    with gr.Blocks(title="CoMa demo", analytics_enabled=False) as demo:
        gr.Markdown("# CoMa: search, and ask the compression\n" + "\n".join(f"* {note}" for note in notes))
        with gr.Tab("Search"):
            search_tab(handlers)
        with gr.Tab("Ask the compression"):
            ask_tab(handlers, str(search.folder), asker.num_compression_tokens)
    return demo


def search_tab(handlers: PageHandlers) -> None:
    """The search tab's components and events (API name `/search`)."""
    import gradio as gr

    def run_search(text: str, image_path: str | None, top_k: float, progress=gr.Progress()):  # noqa: B008
        return handlers.run_search(text, image_path, top_k, progress)

    with gr.Row():
        text = gr.Textbox(label="Text query", placeholder="a red circle", scale=3, elem_id="query")
        image = gr.File(label="Image query (optional)", file_types=["image"], type="filepath", scale=2)
    top_k = gr.Slider(1, 50, value=8, step=1, label="Results")
    button = gr.Button("Search", variant="primary", elem_id="search_button")
    status = gr.Markdown()
    gallery = gr.Gallery(label="Best matches", columns=4, height="auto", elem_id="results")
    table = gr.Dataframe(headers=["rank", "image", "score"], label="Cosine scores", interactive=False)
    gr.on(
        [button.click, text.submit],
        run_search,
        [text, image, top_k],
        [gallery, table, status],
        api_name="search",
        concurrency_id="model",
    )


def ask_tab(handlers: PageHandlers, folder: str, k: int) -> None:
    """The ask tab's components and events (API name `/ask`; choosing an image is private)."""
    import gradio as gr

    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
            pick = gr.Dropdown(choices=handlers.picks, value=None, label=f"or pick one of {folder}")
            preview = gr.Image(label="The image", type="pil", interactive=False, height=240, elem_id="preview")
        with gr.Column():
            tokens = gr.Markdown(elem_id="tokens")
            question = gr.Textbox(label="Question", placeholder="What colour is the circle?", elem_id="question")
            ask = gr.Button("Ask", variant="primary", elem_id="ask_button")
            from_states = gr.Textbox(label=f"From the K = {k} compression states alone", elem_id="from_states")
            visible = gr.Textbox(label="With the image in view (same weights)", elem_id="visible")
    # the newest choice wins: an upload clears the pick and a pick clears the upload
    private = dict(api_visibility="private", concurrency_id="model")
    upload.upload(lambda path: (*handlers.show_image(path, None), None), upload, [preview, tokens, pick], **private)
    pick.input(lambda name: (*handlers.show_image(None, name), None), pick, [preview, tokens, upload], **private)
    gr.on(
        [ask.click, question.submit],
        handlers.run_ask,
        [upload, pick, question],
        [tokens, from_states, visible],
        api_name="ask",
        concurrency_id="model",
    )


def theme():
    """Gradio's default look with system fonts only: nothing fetched from a font service."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.configure_logging(args.debug)
    config = check_checkpoint(args.model_name_or_path, "--model_name_or_path")
    folder = image_folder(args.images)
    if args.generator_name_or_path:
        generator_path, why = args.generator_name_or_path, "named with --generator_name_or_path"
        generator_config = check_checkpoint(generator_path, "--generator_name_or_path")
    else:
        generator_path, why = generator_of(args.model_name_or_path)
        generator_config = (
            config
            if generator_path == args.model_name_or_path
            else cli.checkpoint_config(generator_path, "--generator_name_or_path")
        )
    never_trained = cli.answering_warning(generator_path, generator_config)
    if never_trained:
        logger.warning("The ask tab: %s (--generator_name_or_path).", never_trained)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry and no version check
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit('The demo needs Gradio: pip install -e ".[demo]"')
    index = args.index if args.index != "auto" else ("faiss" if faiss_installed() else "matrix")
    if index == "faiss" and not faiss_installed():
        raise SystemExit("--index faiss needs faiss: pip install faiss-cpu")
    if index == "lancedb" and importlib.util.find_spec("lancedb") is None:
        raise SystemExit('--index lancedb needs lancedb: pip install -e ".[lancedb]"')

    model = load_coma(args.model_name_or_path, args.device)
    generator = model if generator_path == args.model_name_or_path else load_coma(generator_path, args.device)
    notes = [f"Search: `{args.model_name_or_path}` over `{folder}`.", f"Ask: `{generator_path}` ({why})."]
    notes += [f"**Warning:** {never_trained}."] if never_trained else []
    if generator is not model:
        warning = changed_since_training(args.model_name_or_path, generator, generator_path)
        notes += [f"**Note:** {warning}"] if warning else []
    listing = folder_listing(folder)
    if not listing:
        logger.warning("--images %s holds no images yet: add some, or pass a folder of images", folder)
        notes.append(f"**{folder} holds no images yet:** add some, then search (the folder is read on every search).")
    search = FolderSearch(model, folder, args.cache_dir, index, args.batch_size)
    demo = build_demo(search, CompressionAsker(generator), notes, [entry[0] for entry in listing[:PICK_LIMIT]])
    logger.info("%s", json.dumps({"search": args.model_name_or_path, "ask": generator_path, "folder": str(folder)}))
    demo.queue(default_concurrency_limit=args.concurrency).launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[str(folder.resolve())],  # the gallery shows the folder's files
        theme=theme(),
        ssr_mode=False,
        mcp_server=False,
        show_error=False,  # unexpected errors stay in this log; bad input is reported through gr.Error
    )


if __name__ == "__main__":
    cli.run(main)
