"""New tasks from local files in a few lines: TSV, CSV, JSON lines or Parquet, a file or a glob of them per split.

    from tasks.files import register_file_task
    register_file_task("my_sentiment", {"train": "reviews/train.csv", "validation": "reviews/dev.csv"},
                       inputs="sentiment: {text}", targets=lambda row: "positive" if row["label"] == "1" else
                       "negative", metric_fns=[metrics.accuracy])

Inputs and targets are `str.format` templates over a row's columns, or functions of the row (a dict of column
name to value). Rows are read in Python, as the built-in readers read theirs, so a malformed row is an error that
names its file and line (Parquet: its row), and a template naming a column a file lacks names both.
Paths are relative to the data directory (`MTP_DATA_DIR` or gin `DATA_DIR`) or absolute; the format comes from the
file's suffix unless `format=` says it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import seqio

from tasks.common import OUTPUT_FEATURES, tokenized_and_cached
from tasks.sources import DataFormatError, FileSource, read_tsv, text_files, utf8_named

Template = str | Callable[[Mapping[str, Any]], str]
FORMATS = ("tsv", "csv", "jsonl", "parquet")
_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def register_file_task(
    name: str,
    splits: Mapping[str, str | Sequence[str]],
    *,
    inputs: Template | None,
    targets: Template,
    postprocess_fn: Callable | None = None,
    metric_fns: Sequence[Callable] = (),
    format: str | None = None,
    columns: Sequence[str] | None = None,
) -> seqio.Task:
    """Register task `name` whose split files (a path or glob, or a list of them, per split) hold one example per
    row; `inputs` (None for a decoder-only target) and `targets` make its text. `columns` names the columns of
    headerless TSV and CSV files. Returns the task."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"task {name}: format {format!r} is not one of {', '.join(FORMATS)}")
    make = {"inputs": inputs, "targets": targets}

    def read(path: Path, split: str) -> list[dict]:
        kind = format or _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataFormatError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; pass "
                                  f"format= one of {', '.join(FORMATS)} to register_file_task({name!r}, ...)")
        return [_example(path, where, row, make) for where, row in _ROW_READERS[kind](path, columns)]

    paths = {split: text_files([spec] if isinstance(spec, str) else list(spec)) for split, spec in splits.items()}
    seqio.TaskRegistry.add(
        name,
        source=FileSource(name, paths, reader=read),
        preprocessors=tokenized_and_cached(),
        output_features=OUTPUT_FEATURES,
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )
    return seqio.get_mixture_or_task(name)


def _example(path: Path, where: str, row: Mapping[str, Any], make: Mapping[str, Template | None]) -> dict[str, str]:
    out = {}
    for feature, template in make.items():
        if template is None:
            continue
        try:
            text = template.format(**row) if isinstance(template, str) else template(row)
        except KeyError as e:
            raise DataFormatError(f"{path}:{where}: {feature} needs column {e.args[0]!r}; the row has "
                                  f"{', '.join(map(str, row)) or 'no columns'}") from e
        except Exception as e:
            raise DataFormatError(f"{path}:{where}: making {feature} failed: {type(e).__name__}: {e}") from e
        if not isinstance(text, str):
            raise DataFormatError(f"{path}:{where}: {feature} must be text, the function gave {type(text).__name__}")
        out[feature] = text
    return out


# --- row readers: (where in the file, row) for each example ---------------------------------------------------


def _tsv_rows(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    for line, row in read_tsv(path, columns):
        yield str(line), row


def _csv_rows(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    try:
        with utf8_named(path), open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = list(columns) if columns is not None else next(reader, None)
            for row in reader if header is not None else ():
                if len(row) != len(header):
                    raise DataFormatError(f"{path}:{reader.line_num}: expected {len(header)} comma-separated fields "
                                          f"({', '.join(header)}), found {len(row)}")
                yield str(reader.line_num), dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise DataFormatError(f"{path}:{reader.line_num}: {e}") from e


def _jsonl_rows(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    del columns  # each line names its fields
    with utf8_named(path), open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{number}: not a JSON object ({e.msg}, column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{number}: expected a JSON object per line, found "
                                      f"{type(row).__name__}")
            yield str(number), row


def _parquet_rows(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(columns) if columns else None)
    except Exception as e:  # pyarrow's errors name no file
        raise DataFormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


_ROW_READERS: dict[str, Callable[[Path, Sequence[str] | None], Iterator[tuple[str, dict]]]] = {
    "tsv": _tsv_rows, "csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows,
}
