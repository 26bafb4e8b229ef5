"""The LanceDB search backend (`coma_hf.inference.lancedb_store`, `search(..., backend=...)`,
`examples/search_corpus.py --index lancedb`): exact search equals the matrix product, filters, resume, a grown
corpus, and the IVF index's recall."""

from __future__ import annotations

import json
import types

import pytest
import torch

lancedb = pytest.importorskip("lancedb")  # noqa: F841 - the [lancedb] extra; the dev extra installs it

from coma_hf.inference import CorpusRow, encode_corpus, search, search_embeddings, write_shard  # noqa: E402
from coma_hf.inference.lancedb_store import listing_columns, search_lancedb, sync_lancedb  # noqa: E402
from coma_hf.inference.shards import shard_name  # noqa: E402

from utils import command_line, load_example, random_image, tiny_coma  # noqa: E402


def _unit(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    vectors = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(vectors, dim=-1)


def _write_corpus(folder, vectors: torch.Tensor, shard_size: int, prefix: str = "row") -> list[str]:
    ids = [f"{prefix}{index}" for index in range(len(vectors))]
    for start in range(0, len(vectors), shard_size):
        end = min(start + shard_size, len(vectors))
        metadata = {"start": start, "end": end, "skipped": [], "instruction": None}
        write_shard(folder / shard_name(start, end), ids[start:end], vectors[start:end], metadata)
    return ids


def _same_up_to_ties(expected: list[tuple[str, float]], found: list[tuple[str, float]]) -> None:
    """Equal scores within 1e-5, position by position; the ids of equal scores compare as sets (their order is not
    defined)."""
    assert len(found) == len(expected)
    for (_, want), (_, got) in zip(expected, found, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    groups: dict[float, tuple[set, set]] = {}
    for (want_id, want), (got_id, _) in zip(expected, found, strict=True):
        key = round(want, 5)
        groups.setdefault(key, (set(), set()))
        groups[key][0].add(want_id)
        groups[key][1].add(got_id)
    for want_ids, got_ids in groups.values():
        assert want_ids == got_ids


def test_exact_lancedb_search_equals_the_matrix_product(tmp_path):
    vectors = _unit(300, 24)
    vectors[7] = vectors[3]  # an exact tie: compared as a set
    ids = _write_corpus(tmp_path, vectors, shard_size=128)
    queries = torch.cat([vectors[3:4], _unit(5, 24, seed=1)])
    expected = search_embeddings(ids, vectors, queries, top_k=10)
    found = search(tmp_path, queries, top_k=10, backend="lancedb")
    for want, got in zip(expected, found, strict=True):
        _same_up_to_ties(want, got)
    assert {found[0][0][0], found[0][1][0]} == {"row3", "row7"}
    assert search(tmp_path, queries, top_k=10, backend="matrix") == expected


def test_a_filter_keeps_only_matching_rows(tmp_path):
    for name in ("cats/a.png", "cats/b.png", "dogs/c.png", "dogs/d.png"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(len(name)).save(tmp_path / "images" / name)
    columns = listing_columns(tmp_path / "images")
    vectors = _unit(4, 16)
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_shard(folder / shard_name(0, 4), sorted(columns), vectors, {"start": 0, "end": 4, "skipped": []})
    sync_lancedb(folder, tmp_path / "db", columns=columns)
    hits = search_lancedb(tmp_path / "db", vectors[2:3], top_k=4, where="path LIKE 'cats/%'")[0]
    assert {identifier for identifier, _ in hits} == {"cats/a.png", "cats/b.png"}
    sized = search_lancedb(tmp_path / "db", vectors[:1], top_k=4, where=f"bytes = {columns['dogs/c.png']['bytes']}")
    assert [identifier for identifier, _ in sized[0]] == [
        name for name, fields in columns.items() if fields["bytes"] == columns["dogs/c.png"]["bytes"]
    ]
    with pytest.raises(ValueError, match="need the lancedb backend"):
        search(folder, vectors[:1], backend="faiss", where="path LIKE 'cats/%'")


def test_syncing_again_adds_nothing_and_new_shards_only_once(tmp_path):
    vectors = _unit(250, 8)
    _write_corpus(tmp_path, vectors[:200], shard_size=100)
    db = tmp_path / "db"
    assert sync_lancedb(tmp_path, db) == {
        "added_shards": 2,
        "removed_shards": 0,
        "rows": 200,
        "indexed": False,
        "rebuilt": False,
    }
    assert sync_lancedb(tmp_path, db)["added_shards"] == 0
    metadata = {"start": 200, "end": 250, "skipped": []}  # a third shard appears
    write_shard(tmp_path / shard_name(200, 250), [f"row{index}" for index in range(200, 250)], vectors[200:], metadata)
    assert sync_lancedb(tmp_path, db)["added_shards"] == 1
    table = lancedb.connect(str(db)).open_table("corpus").to_arrow()
    assert sorted(table.column("id").to_pylist()) == sorted(f"row{index}" for index in range(250))


class _Hashing:
    """A stand-in for `CoMaModel.encode`: a fixed vector per text, so a redone shard holds the same vectors."""

    config = types.SimpleNamespace(embedding_size=8)

    def encode(self, inputs, **kwargs):
        return torch.stack([_unit(1, 8, seed=sum(map(ord, row["text"])))[0] for row in inputs])


def test_a_grown_corpus_replaces_its_last_short_shard_in_the_table(tmp_path):
    rows = [CorpusRow(index, f"t{index}", {"text": f"text {index}"}) for index in range(7)]
    output, db = tmp_path / "corpus", tmp_path / "db"
    encode_corpus(_Hashing(), rows[:5], output, shard_size=4)  # shards 0-4 and 4-5
    sync_lancedb(output, db)
    encode_corpus(_Hashing(), rows, output, shard_size=4)  # 4-5 is replaced by 4-7
    assert {key: value for key, value in sync_lancedb(output, db).items() if key != "rebuilt"} == {
        "added_shards": 1,
        "removed_shards": 1,
        "rows": 7,
        "indexed": False,
    }
    table = lancedb.connect(str(db)).open_table("corpus").to_arrow()
    assert sorted(table.column("id").to_pylist()) == [f"t{index}" for index in range(7)]
    assert set(table.column("shard").to_pylist()) == {shard_name(0, 4), shard_name(4, 7)}


# Measured 0.93-0.96 over runs on this corpus (40 probes of 141 partitions; lance's k-means is not seeded), 0.81 at
# 20 probes: the floor leaves room for the unseeded training and still fails an index that is not used or too coarse.
IVF_RECALL_FLOOR = 0.85


def test_the_ivf_index_finds_most_of_the_exact_top_ten(tmp_path):
    """20,000 clustered vectors (200 centres): the IVF index's recall@10 against exact search."""
    centres = _unit(200, 32, seed=2)
    noise = 0.3 * torch.randn(20_000, 32, generator=torch.Generator().manual_seed(3))
    vectors = torch.nn.functional.normalize(centres[torch.arange(20_000) % 200] + noise, dim=-1)
    _write_corpus(tmp_path, vectors, shard_size=10_000)
    assert sync_lancedb(tmp_path, tmp_path / "db")["indexed"]
    queries = torch.nn.functional.normalize(vectors[:50] + 0.1 * _unit(50, 32, seed=4), dim=-1)
    approximate = search_lancedb(tmp_path / "db", queries, top_k=10)
    exact = search_lancedb(tmp_path / "db", queries, top_k=10, exact=True)
    recall = sum(len({i for i, _ in a} & {i for i, _ in e}) for a, e in zip(approximate, exact, strict=True)) / (
        10 * len(queries)
    )
    print(f"IVF recall@10 = {recall:.3f}")
    assert recall >= IVF_RECALL_FLOOR


@pytest.mark.slow
def test_search_corpus_script_searches_lancedb_with_a_filter(tmp_path):
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    for index, name in enumerate(("red/a.png", "red/b.png", "blue/c.png")):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(index).save(images / name)
    corpus = tmp_path / "corpus"
    load_example("encode_corpus").main(
        command_line(model=tmp_path / "model", images=images, output_dir=corpus, shard_size=2)
    )
    arguments = command_line(model=tmp_path / "model", index_dir=corpus, index="lancedb", query="a shape", top_k=3)
    hits = load_example("search_corpus").main(arguments + ["--where", "path LIKE 'red/%'", "--images", str(images)])
    assert {identifier for identifier, _ in hits[0]} == {"red/a.png", "red/b.png"}
    matrix = load_example("search_corpus").main(
        command_line(model=tmp_path / "model", index_dir=corpus, index="matrix", query="a shape", top_k=3)
    )
    assert [identifier for identifier, _ in matrix[0]] == [
        identifier for identifier, _ in load_example("search_corpus").main(arguments)[0]
    ]
    assert json.loads((corpus / "manifest.json").read_text())["embedded"] == 3


def test_the_demo_searches_its_cached_folder_in_lancedb_as_in_memory(tmp_path):
    app = load_example("app")
    model, _ = tiny_coma()
    for index in range(5):
        random_image(index).save(tmp_path / f"scene{index}.png")
    hits = {}
    for index in ("matrix", "lancedb"):
        search = app.FolderSearch(model, tmp_path, tmp_path / f"cache-{index}", index, batch_size=2, shard_size=2)
        hits[index] = search.search("a red circle", None, 5)[0]
    _same_up_to_ties(hits["matrix"], hits["lancedb"])
    (entry,) = (tmp_path / "cache-lancedb").iterdir()
    table = lancedb.connect(str(entry / "lancedb")).open_table("corpus").to_arrow()
    assert sorted(table.column("path").to_pylist()) == [f"scene{index}.png" for index in range(5)]


def test_columns_new_to_the_table_rebuild_it_and_a_sync_without_columns_keeps_them(tmp_path):
    names = [f"img{index}.png" for index in range(6)]
    for index, name in enumerate(names):
        random_image(index).save(tmp_path / name)
    folder, db = tmp_path / "corpus", tmp_path / "db"
    folder.mkdir()
    vectors = _unit(6, 8)
    write_shard(folder / shard_name(0, 3), names[:3], vectors[:3], {"start": 0, "end": 3, "skipped": []})
    sync_lancedb(folder, db)  # no columns yet (search_corpus without --images)
    assert sync_lancedb(folder, db, columns=listing_columns(tmp_path))["rebuilt"]
    write_shard(folder / shard_name(3, 6), names[3:], vectors[3:], {"start": 3, "end": 6, "skipped": []})
    assert sync_lancedb(folder, db) == {  # the new shard's rows get the table's fields, empty
        "added_shards": 1,
        "removed_shards": 0,
        "rows": 6,
        "indexed": False,
        "rebuilt": False,
    }
    table = lancedb.connect(str(db)).open_table("corpus").to_arrow().sort_by("id")
    assert table.column("path").to_pylist() == names[:3] + [None] * 3
    with pytest.raises(ValueError, match="table's own"):
        sync_lancedb(folder, db, columns={names[0]: {"shard": "x"}})


def test_a_shard_of_skipped_rows_and_an_empty_corpus(tmp_path):
    folder, db = tmp_path / "corpus", tmp_path / "db"
    folder.mkdir()
    skipped = [{"row": 0, "id": "a", "error": "corrupt"}]
    write_shard(folder / shard_name(0, 1), [], torch.empty(0, 8), {"start": 0, "end": 1, "skipped": skipped})
    assert sync_lancedb(folder, db)["added_shards"] == 0  # nothing stored, and nothing reported added again
    assert search(folder, _unit(2, 8), backend="lancedb", db_dir=db) == [[], []]
    write_shard(folder / shard_name(1, 3), ["b", "c"], _unit(2, 8), {"start": 1, "end": 3, "skipped": []})
    assert sync_lancedb(folder, db)["added_shards"] == 1 and sync_lancedb(folder, db)["added_shards"] == 0


def test_the_index_follows_the_size_and_search_can_ask_for_exact(tmp_path):
    vectors = _unit(400, 16)
    ids = _write_corpus(tmp_path, vectors, shard_size=200)
    db = tmp_path / "db"
    assert sync_lancedb(tmp_path, db, index_min_rows=300)["indexed"]
    queries = _unit(3, 16, seed=5)
    exact = search(tmp_path, queries, top_k=5, backend="lancedb", db_dir=db, exact=True)
    for want, got in zip(search_embeddings(ids, vectors, queries, top_k=5), exact, strict=True):
        _same_up_to_ties(want, got)
    (tmp_path / shard_name(200, 400)).unlink()  # the corpus shrinks below the threshold: the index goes
    assert sync_lancedb(tmp_path, db, index_min_rows=300) == {
        "added_shards": 0,
        "removed_shards": 1,
        "rows": 200,
        "indexed": False,
        "rebuilt": False,
    }
