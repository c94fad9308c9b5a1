from __future__ import annotations

import json

import numpy as np
import pytest

from airlora.config import DataConfig
from airlora.data import DataError, load_task, read_file
from airlora.data.batching import bucketed_batches, collate, encode
from conftest import make_rows, write_csv


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_csv_with_header(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("hello world", 1), ("good bye", 0)])
    ex = read_file(path, cfg())
    assert ex.texts == ["hello world", "good bye"]
    assert ex.labels.tolist() == [1, 0]


def test_original_ag_news_release_is_detected_and_relabelled(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"3","Wall St. Bears","Short-sellers are back."\n"1","Vote","Polls open."\n')
    ex = read_file(path, cfg())
    assert ex.texts == ["Wall St. Bears Short-sellers are back.", "Vote Polls open."]
    assert ex.labels.tolist() == [2, 0]


def test_jsonl_and_parquet_with_custom_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": "a b", "y": 0}, {"body": "c d", "y": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        ex = read_file(tmp_path / name, cfg(text_column="body", label_column="y"))
        assert ex.texts == ["a b", "c d"] and ex.labels.tolist() == [0, 1]


def test_joined_text_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("T", "D", 1)], header=("title", "desc", "label"))
    assert read_file(path, cfg(text_column="title+desc")).texts == ["T D"]


@pytest.mark.parametrize(
    "content, problem, row",
    [
        ("text,label\n", "no data rows", None),
        ("", "empty", None),
        ("words,label\nhi,1\n", "missing column(s) ['text']", None),
        ("text,label\nhi,1\nbye,one\n", "label 'one' is not an integer", 2),
        ("text,label\nhi,1\nbye,2,3\n", "expected 2 fields", 2),
        ("text,label\nhi,1\n,2\n", "empty text", 2),
        ("text,label\nhi,1\nbye,\n", "missing value in label column", 2),
    ],
)
def test_malformed_csv_names_file_row_and_problem(tmp_path, content, problem, row):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_file(path, cfg())
    message = str(info.value)
    assert str(path) in message and problem in message
    assert info.value.row == row
    if row is not None:
        assert f"row {row}" in message


def test_unreadable_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nok,1\ncaf\xe9,2\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: unreadable encoding.*line 3"):
        read_file(path, cfg())


def test_malformed_jsonl_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    with pytest.raises(DataError, match=r"row 2: invalid JSON"):
        read_file(path, cfg())


def test_label_out_of_range_against_num_labels(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    write_csv(folder / "train.csv", make_rows(60))
    write_csv(folder / "test.csv", [("hello", 0), ("bye", 7)])
    with pytest.raises(DataError, match=r"test.*row 2: label 7 out of range 0\.\.3"):
        load_task(cfg(source=str(folder), validation_size=10), seed=0)
    write_csv(folder / "test.csv", [("hello", -1)])
    with pytest.raises(DataError, match="label -1 out of range"):
        load_task(cfg(source=str(folder), validation_size=10), seed=0)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task(cfg(source=str(tmp_path / "nope.csv")), seed=0)


def test_data_dir_resolution_and_seeded_disjoint_splits(tiny_data_dir, monkeypatch):
    monkeypatch.setenv("AIRLORA_DATA_DIR", str(tiny_data_dir))
    a = load_task(cfg(source="tiny", validation_size=50), seed=3)
    b = load_task(cfg(source="tiny", validation_size=50), seed=3)
    c = load_task(cfg(source="tiny", validation_size=50), seed=4)
    assert a.num_labels == 4
    assert (len(a.train), len(a.validation), len(a.test)) == (350, 50, 80)
    assert a.validation.texts == b.validation.texts and a.train.texts == b.train.texts
    assert a.validation.texts != c.validation.texts
    # The edge's evaluation rows never appear in the server's training rows (by position).
    rows = make_rows(400, seed=1)
    index = {t: i for i, (t, _) in enumerate(rows)}
    train_rows = {index[t] for t in a.train.texts}
    val_rows = {index[t] for t in a.validation.texts}
    assert not train_rows & val_rows


def test_single_file_gets_a_carved_test_split(tmp_path):
    path = write_csv(tmp_path / "all.csv", make_rows(200))
    task = load_task(cfg(source=str(path), validation_size=20), seed=0)
    assert len(task.validation) == 20 and len(task.test) == 20 and len(task.train) == 160


def test_bucketed_batches_cover_every_example_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1000)
    batches = bucketed_batches(lengths, 16, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.array_split(rng.permutation(1000), 63)])
    assert spread < random_spread / 3


def test_collate_pads_to_the_longest_in_batch(tiny_model_dir):
    from transformers import AutoTokenizer

    from airlora.data.loading import TextExamples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = encode(tok, TextExamples(["war", "goal match team season"], np.array([0, 1])), 16)
    batch = collate(split, np.array([0, 1]), tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum(1).tolist() == [3, 6]
    assert batch["labels"].tolist() == [0, 1]


def test_hub_loader_reads_a_dataset_folder(tiny_data_dir, tmp_path, monkeypatch):
    """The hub code path (datasets.load_dataset) on a local dataset folder, as when offline."""
    from airlora.data.loading import _load_hub

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    train, test = _load_hub(cfg(source=str(tiny_data_dir / "tiny")))
    assert len(train) == 400 and test is not None and len(test) == 80
    assert train.texts[0] == make_rows(400, seed=1)[0][0]


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest sets it before anything imports the hub
    monkeypatch.delenv("AIRLORA_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="could not be loaded"):
        load_task(cfg(source="no-such-user/no-such-dataset"), seed=0)


def test_a_carved_test_split_is_the_same_rows_for_every_seed(tmp_path):
    """Without a test file the test rows are fixed: no seed trains, tunes or selects on rows
    another seed scores as test."""
    from airlora.config import DataConfig
    from airlora.data import load_task

    path = write_csv(tmp_path / "all.csv", make_rows(300))
    config = DataConfig(source=str(path), validation_size=40)
    splits = [load_task(config, seed) for seed in (0, 1, 2000)]
    tests = [s.test.texts for s in splits]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 30
    for s in splits:
        seen = set(s.train.texts) | set(s.validation.texts)
        assert not seen & set(tests[0])
    assert splits[0].validation.texts != splits[1].validation.texts  # still seeded
