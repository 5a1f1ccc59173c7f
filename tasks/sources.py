"""Readers for the official data files and the seqio `DataSource` that serves them.

Files are parsed in Python (so that a bad row is reported with its file and line) into columns, and handed to
`tf.data.Dataset.from_tensor_slices`: unlike `from_generator`, such a dataset can be checkpointed mid-stream, which
exact resume of training needs. Paths are resolved under `settings.data_dir()` when a dataset is built.
"""

from __future__ import annotations

import csv
import json
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from mtplatform import settings

Row = dict[str, Any]
Reader = Callable[[Path, str], list[Row]]  # (file, split) -> rows

# Some official TSV fields (QNLI, MNLI) exceed csv's default field limit once quoting is off.
csv.field_size_limit(sys.maxsize)


class DataFormatError(ValueError):
    """A data file does not have the format of the official release; the message names file and line."""


class FileSource(seqio.FunctionDataSource):
    """Serves the rows a `reader(path, split)` parses from one file (or file list) per split.

    `split_paths` maps a split to a path relative to the data directory, or to a function of the data directory
    that returns the files. `num_input_examples` declares the official sizes so that rate functions work without
    reading the data; where a split has no declared size it is counted from the files on first request.
    """

    def __init__(
        self,
        task_name: str,
        split_paths: Mapping[str, str | Callable[[Path], list[Path]]],
        reader: Reader,
        num_input_examples: Mapping[str, int] | None = None,
    ):
        self._task_name = task_name
        self._split_paths = dict(split_paths)
        self._reader = reader
        self._counted: dict[str, int] = {}
        super().__init__(
            dataset_fn=self._dataset_fn,
            splits=list(split_paths),
            num_input_examples=dict(num_input_examples or {}),
        )

    def files(self, split: str) -> list[Path]:
        """The files of `split`; a clear error names the task and the expected path when one is missing."""
        missing = self.missing(split)
        if missing:
            raise FileNotFoundError(f"task {self._task_name}, split {split!r}: expected data file {missing} "
                                    f"(data directory from {settings.DATA_DIR_ENV} or gin DATA_DIR)")
        return self._paths(split)

    def missing(self, split: str) -> str | None:
        """The expected file (or glob) of `split` that is not there, or None where every file is."""
        spec = self._split_paths[split] if split in self._split_paths else None
        paths = self._paths(split)
        absent = [p for p in paths if not p.is_file()]
        if absent:
            return str(absent[0])
        if not paths:
            return f"{' or '.join(getattr(spec, 'patterns', ['files']))} under {settings.data_dir()}"
        return None

    def _paths(self, split: str) -> list[Path]:
        if split not in self._split_paths:
            raise ValueError(f"task {self._task_name} has no split {split!r}; its splits are {list(self._split_paths)}")
        spec = self._split_paths[split]
        root = settings.data_dir()
        return spec(root) if callable(spec) else [root / spec]

    def read_rows(self, split: str) -> list[Row]:
        """All rows of `split` as Python dicts, in file order."""
        rows: list[Row] = []
        for path in self.files(split):
            rows.extend(self._reader(path, split))
        return rows

    def num_input_examples(self, split: str) -> int | None:
        declared = self._num_input_examples.get(split)
        return declared if declared is not None else self.count(split)

    def declared_examples(self, split: str) -> int | None:
        """The official size given at registration, if any."""
        return self._num_input_examples.get(split)

    def count(self, split: str) -> int:
        """The examples the files of `split` hold, read once."""
        if split not in self._counted:
            self._counted[split] = len(self.read_rows(split))
        return self._counted[split]

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one file per split: seqio's Task shuffles examples after preprocessing
        rows = self.read_rows(split)
        if not rows:
            raise DataFormatError(f"task {self._task_name}, split {split!r}: {self.files(split)} holds no examples")
        return tf.data.Dataset.from_tensor_slices(_columns(rows))


def _columns(rows: Sequence[Row]) -> dict[str, Any]:
    """Row dicts to column tensors; list-valued fields become ragged."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], list):
            out[key] = tf.ragged.constant(values, dtype=tf.string)
        elif isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.array(values)
    return out


# --- TSV (GLUE) -------------------------------------------------------------------------------------------------


def read_tsv(path: Path, fieldnames: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, fields by name) for each data row of a GLUE TSV file.

    Quote handling is off: the official files contain stray `"` (QNLI) that are text, not quoting. A UTF-8 byte-order
    mark (MRPC) is dropped. Column names come from the header row, or from `fieldnames` for files without one (CoLA).
    """
    try:
        yield from _tsv_rows(path, fieldnames)
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 ({e.reason}, byte "
                              f"{e.object[e.start:e.start + 1]!r})") from e


def _first_undecodable_line(path: Path) -> int:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _tsv_rows(path: Path, fieldnames: Sequence[str] | None) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(fieldnames) if fieldnames is not None else next(reader, None)
        if header is None:
            return
        for row in reader:
            line = reader.line_num
            if len(row) != len(header):
                raise DataFormatError(
                    f"{path}:{line}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                    f"found {len(row)}"
                )
            yield line, dict(zip(header, row, strict=True))


# --- SQuAD v1.1 JSON --------------------------------------------------------------------------------------------


def read_squad(path: Path, keep_article: Callable[[str], bool] | None = None) -> list[Row]:
    """SQuAD v1.1 questions in the TFDS feature layout: id, title, context, question, answers (all gold texts)."""
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not a SQuAD v1.1 JSON file with a top-level 'data' list ({e})") from e
    rows = []
    for a, article in enumerate(articles):
        title = article.get("title", "")
        if keep_article is not None and not keep_article(title):
            continue
        for p, paragraph in enumerate(_field(article, "paragraphs", path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            for q, qa in enumerate(_field(paragraph, "qas", path, where)):
                answers = [_field(ans, "text", path, f"{where}.qas[{q}].answers[{i}]")
                           for i, ans in enumerate(qa.get("answers", []))]
                if not answers:
                    raise DataFormatError(
                        f"{path}: {where} question {qa.get('id')!r} has no answers "
                        "(SQuAD v1.1 questions always have one; is this a v2.0 file?)"
                    )
                rows.append(
                    {
                        "id": _field(qa, "id", path, f"{where}.qas[{q}]"),
                        "title": title,
                        "context": _field(paragraph, "context", path, where),
                        "question": _field(qa, "question", path, f"{where}.qas[{q}]"),
                        "answers": answers,
                    }
                )
    return rows


def _field(record: Any, key: str, path: Path, where: str) -> Any:
    """record[key], or an error naming the file and the place in it that lacks `key`."""
    if not isinstance(record, dict) or key not in record:
        raise DataFormatError(f"{path}: {where} has no {key!r} field (SQuAD v1.1 layout)")
    return record[key]


def in_squad_dev_train_split(title: str) -> bool:
    """The article-level split of SQuAD dev used for training where the official train file is absent.

    An article goes to training when crc32 of its title modulo 10 is below 8 (about 80% of the 48 dev articles):
    deterministic, independent of file order, and no article's paragraphs are on both sides.
    """
    return zlib.crc32(title.encode("utf-8")) % 10 < 8


# --- CoNLL-2003 -------------------------------------------------------------------------------------------------

NER_TYPES = ("PER", "ORG", "LOC", "MISC")


def read_conll(path: Path) -> list[Row]:
    """Sentences of a CoNLL-2003 file (`token POS chunk NER` per line, blank lines between sentences,
    `-DOCSTART-` lines between documents) as `tokens` and their IOB1 `tags`."""
    rows: list[Row] = []
    tokens: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if tokens:
            rows.append({"tokens": list(tokens), "tags": list(tags)})
            tokens.clear()
            tags.clear()

    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                flush()
                continue
            if fields[0] == "-DOCSTART-":
                flush()
                continue
            if len(fields) != 4:
                raise DataFormatError(f"{path}:{line_no}: expected 4 space-separated fields, found {len(fields)}")
            tag = fields[3]
            if tag != "O" and (tag[:2] not in ("B-", "I-") or tag[2:] not in NER_TYPES):
                raise DataFormatError(f"{path}:{line_no}: unknown NER tag {tag!r}")
            tokens.append(fields[0])
            tags.append(tag)
    flush()
    return rows


# --- plain text -------------------------------------------------------------------------------------------------


def text_files(patterns: Sequence[str]) -> Callable[[Path], list[Path]]:
    """Files matching glob `patterns` (relative to the data directory, or absolute), sorted for a stable order."""

    def resolve(root: Path) -> list[Path]:
        found: set[Path] = set()
        for pattern in patterns:
            base = Path(pattern) if Path(pattern).is_absolute() else root / pattern
            anchor = Path(base.anchor)
            found.update(p for p in anchor.glob(str(base.relative_to(anchor))) if p.is_file())
        return sorted(found)

    resolve.patterns = list(patterns)  # named in the error when nothing matches
    return resolve


WRAPPED_LINE_CHARS = 100  # a file whose median non-empty line is shorter, and that has blank lines, is wrapped


def read_text_lines(path: Path, keep_line: Callable[[str], bool] | None = None) -> list[Row]:
    """The documents of a text file as `{"text": document}`: each non-empty line, or, in a file laid out as BERT's
    pretraining text (one sentence or wrapped line per line, a blank line between documents: short lines and
    blank ones, as the NLTK Gutenberg texts), each run of non-empty lines joined by spaces.

    UTF-8, falling back to Latin-1 for files that are not (NLTK ships `shakespeare-caesar.txt` in Latin-1);
    CRLF line ends are dropped (`melville-moby_dick.txt`).
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [line.strip() for line in text.splitlines()]
    documents = _paragraphs(lines) if _is_wrapped(lines) else [line for line in lines if line]
    return [{"text": doc} for doc in documents if keep_line is None or keep_line(doc)]


def _is_wrapped(lines: list[str]) -> bool:
    sizes = sorted(len(line) for line in lines if line)
    return bool(sizes) and len(sizes) < len(lines) and sizes[len(sizes) // 2] < WRAPPED_LINE_CHARS


def _paragraphs(lines: list[str]) -> list[str]:
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def in_text_validation_split(line: str) -> bool:
    """Documents held out for validation of the unsupervised objectives: crc32 of the document modulo 100 is 0
    (about 1%)."""
    return zlib.crc32(line.encode("utf-8")) % 100 == 0
