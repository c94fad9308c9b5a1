"""Load a text-classification task from local files or the Hugging Face hub.

Local rows are read with the standard library's ``csv``/``json`` and with pyarrow for Parquet,
so that every problem can be reported with the file and the row it is in.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from airlora.config import DataConfig
from airlora.datasets import packaged_dataset, packaged_datasets
from airlora.errors import DataError

FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextExamples:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: np.ndarray  # int64, shape (n,)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextExamples:
        index = np.asarray(index, dtype=np.int64)
        return TextExamples([self.texts[i] for i in index], self.labels[index])


@dataclass(frozen=True)
class TaskData:
    """The three splits of a task.

    ``train`` is the server's data, ``validation`` is carved out of the training file and is
    what the edge evaluates on every round, ``test`` is touched only for final numbers.
    """

    train: TextExamples
    validation: TextExamples
    test: TextExamples
    num_labels: int
    source: str


# ----------------------------------------------------------------------------- file readers


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "the file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            path, f"unreadable encoding: byte 0x{raw[err.start]:02x} on line {line} is not UTF-8"
        ) from err


def _text_columns(spec: str) -> list[str]:
    return [c.strip() for c in spec.split("+") if c.strip()]


def _parse_label(path: Path, row: int, value: object) -> int:
    if isinstance(value, bool):
        raise DataError(path, f"label {value!r} is not an integer", row)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise DataError(path, f"label {value!r} is not an integer", row)


def _rows_to_examples(
    path: Path, rows: Iterable[tuple[int, dict]], text_cols: list[str], label_col: str
) -> TextExamples:
    texts: list[str] = []
    labels: list[int] = []
    for row, record in rows:
        parts = []
        for col in text_cols:
            value = record.get(col)
            if value is None:
                raise DataError(path, f"missing value in text column '{col}'", row)
            parts.append(str(value))
        text = " ".join(p for p in parts if p)
        if not text.strip():
            raise DataError(path, "empty text", row)
        if label_col not in record or record[label_col] is None or record[label_col] == "":
            raise DataError(path, f"missing value in label column '{label_col}'", row)
        texts.append(text)
        labels.append(_parse_label(path, row, record[label_col]))
    if not texts:
        raise DataError(path, "the file has a header but no data rows")
    return TextExamples(texts, np.asarray(labels, dtype=np.int64))


def _check_columns(path: Path, present: Sequence[str], text_cols: list[str], label_col: str):
    missing = [c for c in [*text_cols, label_col] if c not in present]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; the file has columns {list(present)}")


def _looks_like_original_ag_news(first_row: list[str]) -> bool:
    return len(first_row) == 3 and first_row[0].strip() in {"1", "2", "3", "4"}


def read_csv(path: Path, config: DataConfig) -> TextExamples:
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as err:
        raise DataError(path, f"malformed CSV: {err}", 1) from err
    text_cols = _text_columns(config.text_column)
    original = config.format == "ag_news_csv" or (
        config.format == "auto"
        and config.header
        and config.text_column not in header
        and _looks_like_original_ag_news(header)
    )
    if not config.header and not original:
        # Columns by position; the first line is the first data row.
        columns = [str(i) for i in range(len(header))]
        label_col = config.label_column
        bad = [c for c in [*text_cols, label_col] if not c.isdigit()]
        if bad:
            raise DataError(
                path,
                f"without a header, columns are 0-based positions; got {bad} "
                f"(this file has {len(header)} columns: 0..{len(header) - 1})",
            )
        _check_columns(path, columns, text_cols, label_col)
        first_rows: list[tuple[int, list[str]]] = [(1, header)]
        start = 2
    elif original:
        # The original release: no header, class index 1-4, title, description.
        columns = ["label", "title", "description"]
        text_cols, label_col = ["title", "description"], "label"
        first_rows = [(1, header)]
        start = 2
    else:
        columns = header
        label_col = config.label_column
        _check_columns(path, columns, text_cols, label_col)
        first_rows, start = [], 1  # rows are numbered from the first data row

    def records() -> Iterable[tuple[int, dict]]:
        rows = iter(first_rows)
        for row, values in rows:
            yield row, _record(row, values)
        row = start - 1
        try:
            for values in reader:
                row += 1
                if not values:
                    continue
                yield row, _record(row, values)
        except csv.Error as err:
            raise DataError(path, f"malformed CSV: {err}", row + 1) from err

    def _record(row: int, values: list[str]) -> dict:
        if len(values) != len(columns):
            raise DataError(
                path, f"expected {len(columns)} fields ({columns}), found {len(values)}", row
            )
        return dict(zip(columns, values, strict=True))

    examples = _rows_to_examples(path, records(), text_cols, label_col)
    if original:
        if examples.labels.min() < 1 or examples.labels.max() > 4:
            bad = int(np.flatnonzero((examples.labels < 1) | (examples.labels > 4))[0]) + 1
            raise DataError(path, "class index out of range 1-4 in the AG News CSV release", bad)
        return TextExamples(examples.texts, examples.labels - 1)
    return examples


def read_jsonl(path: Path, config: DataConfig) -> TextExamples:
    text = _decode(path)
    text_cols = _text_columns(config.text_column)

    def records() -> Iterable[tuple[int, dict]]:
        for row, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, f"invalid JSON: {err.msg}", row) from err
            if not isinstance(record, dict):
                raise DataError(path, "each line must be a JSON object", row)
            _check_columns(path, list(record), text_cols, config.label_column)
            yield row, record

    return _rows_to_examples(path, records(), text_cols, config.label_column)


def read_parquet(path: Path, config: DataConfig) -> TextExamples:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(path, "the file is empty")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(path, f"not a readable Parquet file: {err}") from err
    text_cols = _text_columns(config.text_column)
    _check_columns(path, table.column_names, text_cols, config.label_column)
    if table.num_rows == 0:
        raise DataError(path, "the file has no rows")
    columns = {c: table.column(c).to_pylist() for c in [*text_cols, config.label_column]}
    rows = ((i + 1, {c: v[i] for c, v in columns.items()}) for i in range(table.num_rows))
    return _rows_to_examples(path, rows, text_cols, config.label_column)


def read_file(path: Path, config: DataConfig) -> TextExamples:
    """Read one local file into texts and labels, or raise :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    fmt = config.format
    if fmt == "auto":
        fmt = FILE_SUFFIXES.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(
                path, f"unknown file type '{path.suffix}'; use one of {sorted(FILE_SUFFIXES)}"
            )
    if fmt in {"csv", "ag_news_csv"}:
        return read_csv(path, config)
    if fmt == "jsonl":
        return read_jsonl(path, config)
    return read_parquet(path, config)


# ----------------------------------------------------------------------------- resolution


def _split_files(folder: Path) -> tuple[Path, Path | None]:
    def find(stem: str) -> Path | None:
        for suffix in FILE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    train = find("train")
    if train is None:
        raise DataError(folder, "the folder holds no train.csv, train.jsonl or train.parquet")
    return train, find("test")


def _load_hub(config: DataConfig) -> tuple[TextExamples, TextExamples | None]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(config.source, "the 'datasets' package is needed for hub data") from err
    try:
        dsd = datasets.load_dataset(config.source)
    except Exception as err:
        raise DataError(
            config.source,
            "not a local file or folder, not a data set shipped with airlora "
            f"({', '.join(packaged_datasets())}), and the hub dataset could not be loaded "
            f"({type(err).__name__}: {err}). Set AIRLORA_DATA_DIR or --data-dir to a folder "
            f"holding '{config.source}/train.csv', or pass a file path.",
        ) from err
    text_cols = _text_columns(config.text_column)

    def convert(split: str) -> TextExamples:
        ds = dsd[split]
        _check_columns(f"{config.source}[{split}]", ds.column_names, text_cols, config.label_column)
        rows = ((i + 1, r) for i, r in enumerate(ds))
        return _rows_to_examples(
            Path(f"{config.source}[{split}]"), rows, text_cols, config.label_column
        )

    return convert("train"), convert("test") if "test" in dsd else None


@dataclass(frozen=True)
class DataSource:
    """Where ``DataConfig.source`` was found: a ``file``, a ``folder`` (a path or a name under
    the data directory), a ``packaged`` data set, or the ``hub`` (``path`` is None)."""

    kind: str
    path: Path | None


def resolve_source(config: DataConfig) -> DataSource:
    """Find ``config.source``: a path, then a name under the data directory, then a data set
    shipped with the package, then a Hugging Face hub id. Nothing is read yet."""
    source = Path(config.source).expanduser()
    if source.is_file():
        return DataSource("file", source)
    if source.is_dir():
        return DataSource("folder", source)
    data_dir = config.resolved_data_dir()
    if data_dir is not None and (data_dir / config.source).is_dir():
        return DataSource("folder", data_dir / config.source)
    if source.suffix.lower() in FILE_SUFFIXES:
        raise DataError(source, "no such file")
    packaged = packaged_dataset(config.source)
    if packaged is not None:
        return DataSource("packaged", packaged)
    return DataSource("hub", None)


TEST_SPLIT_SEED = 0


def load_task(config: DataConfig, seed: int) -> TaskData:
    """Resolve ``config.source``, read it, and cut seeded train / validation splits.

    Without a test file, the test split is carved out of the training rows too, the same rows
    whatever the seed (:data:`TEST_SPLIT_SEED`); validation and training rows are drawn from
    the rest with ``seed``.
    """
    test: TextExamples | None
    where = resolve_source(config)
    if where.kind == "file":
        train, test = read_file(where.path, config), None
        origin = test_origin = str(where.path)
    elif where.kind in {"folder", "packaged"}:
        train_path, test_path = _split_files(where.path)
        train = read_file(train_path, config)
        test = read_file(test_path, config) if test_path else None
        origin, test_origin = str(train_path), str(test_path)
    else:
        train, test = _load_hub(config)
        origin, test_origin = f"hub:{config.source}[train]", f"hub:{config.source}[test]"

    if config.label_offset:
        train = TextExamples(train.texts, train.labels - config.label_offset)
        if test is not None:
            test = TextExamples(test.texts, test.labels - config.label_offset)

    num_labels = config.num_labels or int(train.labels.max()) + 1
    for name, split in (("train", train), ("test", test)):
        if split is None:
            continue
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_labels))
        if bad.size:
            label = int(split.labels[bad[0]])
            shown = (
                f"label {label + config.label_offset} (minus label_offset "
                f"{config.label_offset}: {label})"
                if config.label_offset
                else f"label {label}"
            )
            hint = (
                "; labels numbered from 1? set label_offset 1 (--label-offset 1)"
                if label == num_labels and not config.label_offset
                else ""
            )
            raise DataError(
                origin if name == "train" else test_origin,
                f"{shown} out of range 0..{num_labels - 1}{hint}",
                int(bad[0]) + 1,
            )
    present = np.unique(train.labels)
    if num_labels < 2 or present.size < 2:
        raise DataError(
            origin,
            f"a classification task needs at least 2 classes; the training labels hold only "
            f"{present.tolist()}",
        )
    n_val = config.validation_size
    n_test = 0 if test is not None else min(max(len(train) // 10, 1), 1000)
    if len(train) <= n_val + n_test:
        raise DataError(
            origin,
            f"{len(train)} training rows cannot give a {n_val}-row validation split "
            "and leave rows to train on; lower validation_size",
        )
    pool = np.arange(len(train))
    if test is None:
        # One test split for every seed: a row scored as test under one seed is never
        # trained, tuned or selected on under another (a tuning seed's validation, say).
        fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(train))
        test, pool = train.subset(fixed[:n_test]), fixed[n_test:]
    order = pool[np.random.default_rng(seed).permutation(len(pool))]
    validation = train.subset(order[:n_val])
    rest = order[n_val:]
    if config.max_train_samples is not None:
        rest = rest[: config.max_train_samples]
    train_split = train.subset(rest)

    return TaskData(train_split, validation, test, num_labels, origin)
