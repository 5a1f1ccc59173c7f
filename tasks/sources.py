"""Readers for the official data files and the seqio `DataSource` that serves them.

Task files are parsed in Python (so that a bad row is reported with its file and line) into columns, and handed to
`tf.data.Dataset.from_tensor_slices`: unlike `from_generator`, such a dataset can be checkpointed mid-stream, which
exact resume of training needs. Plain-text corpora, which can be far larger than memory, are streamed instead by
tf.data's own readers (`TextSource`), checkpointable too. Paths are resolved under `settings.data_dir()` when a
dataset is built.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
        self._read: dict[str, tuple[list[tuple], dict[str, Any]]] = {}  # split -> (its files' checksums, columns)
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
                                    f"(data directory from {settings.DATA_DIR_ENV} or gin data_dir.path)")
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
        return tf.data.Dataset.from_tensor_slices(self._columns(split))

    def _columns(self, split: str) -> dict[str, Any]:
        """`split`'s rows as columns, parsed once per version of its files: a process builds a task's pipeline
        again for every stage of an experiment and every training run it starts (CoNLL's training file took 0.4 s
        to parse and 1.9 s to make columns of, each time). A file whose bytes change is read again: files are
        compared by checksum (SQuAD's 9 MB in some 10 ms), as a modification time moves only every few
        milliseconds and misses a file rewritten at once to the same size."""
        files = self.files(split)
        checksums = [(str(path), zlib.crc32(path.read_bytes())) for path in files]
        if split not in self._read or self._read[split][0] != checksums:
            rows = self.read_rows(split)
            if not rows:
                raise DataFormatError(f"task {self._task_name}, split {split!r}: {files} holds no examples")
            self._read[split] = (checksums, _as_columns(rows))
        return self._read[split][1]


def _as_columns(rows: Sequence[Row]) -> dict[str, Any]:
    """Row dicts to column arrays; list-valued fields become ragged string tensors."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], list):
            out[key] = _ragged_strings(values)
        elif isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        else:
            out[key] = np.array(values)
    return out


def _ragged_strings(values: Sequence[Sequence[str]]) -> tf.RaggedTensor:
    """Lists of strings as one ragged tensor, from its flat values and row lengths: what `tf.ragged.constant`
    gives (int64 row splits), without its walk over every nested element in Python (CoNLL's 14,041 training
    sentences: 0.09 s against 1.9)."""
    flat = tf.constant([item for value in values for item in value], dtype=tf.string)
    return tf.RaggedTensor.from_row_lengths(flat, np.array([len(value) for value in values], dtype=np.int64))


# --- TSV (GLUE) -------------------------------------------------------------------------------------------------


def read_tsv(path: Path, fieldnames: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, fields by name) for each data row of a GLUE TSV file.

    Quote handling is off: the official files contain stray `"` (QNLI) that are text, not quoting. A UTF-8 byte-order
    mark (MRPC) is dropped. Column names come from the header row, or from `fieldnames` for files without one (CoLA).
    """
    with utf8_named(path):
        yield from _tsv_rows(path, fieldnames)


@contextmanager
def utf8_named(path: Path) -> Iterator[None]:
    """A UnicodeDecodeError while reading `path` becomes an error naming the file and its first line that is not
    UTF-8 (Python's names neither)."""
    try:
        yield
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
        with utf8_named(path), open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
    except (json.JSONDecodeError, KeyError) as e:
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


def read_conll(path: Path, with_syntax: bool = False) -> list[Row]:
    """Sentences of a CoNLL-2003 file (`token POS chunk NER` per line, blank lines between sentences,
    `-DOCSTART-` lines between documents) as `tokens` and their IOB1 `tags` (and, if asked, part-of-speech `pos` and
    IOB1 `chunks`)."""
    rows: list[Row] = []
    tokens: list[str] = []
    tags: list[str] = []
    pos: list[str] = []
    chunks: list[str] = []

    def flush() -> None:
        if tokens:
            syntax = {"pos": list(pos), "chunks": list(chunks)} if with_syntax else {}
            rows.append({"tokens": list(tokens), "tags": list(tags), **syntax})
            for column in (tokens, tags, pos, chunks):
                column.clear()

    with utf8_named(path), open(path, encoding="utf-8") as f:
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
            pos.append(fields[1])
            chunks.append(fields[2])
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
LAYOUT_SAMPLE_LINES = 2000  # lines read from the start of a file to tell its layout
VALIDATION_BUCKETS = 100  # one document in this many, by a hash of its text, is held out for validation


class TextSource(FileSource):
    """Documents of plain-text files, streamed from disk by tf.data: memory does not grow with the corpus, the time
    to the first example does not either, and the iterator (file offsets, a partial paragraph) can be checkpointed
    for exact resume. About 1% of documents, chosen by a hash of the text, form the validation split.

    A document is a non-empty line, except in files laid out as BERT's pretraining text (short lines and blank ones,
    as the NLTK Gutenberg books, whose lines are wrapped): there a run of non-empty lines joined by spaces. Lines
    that are not UTF-8 are read as Latin-1 (NLTK's `shakespeare-caesar.txt`); CR line ends are dropped.
    """

    def __init__(self, task_name: str, patterns: Sequence[str]):
        files = text_files(patterns)
        super().__init__(task_name, {"train": files, "validation": files}, reader=None)
        self._has_documents: dict[tuple[str, ...], bool] = {}

    def read_rows(self, split: str) -> list[Row]:
        return [{"text": text.decode("utf-8")} for text in self._documents(split).as_numpy_iterator()]

    def num_input_examples(self, split: str) -> None:
        """Unknown, as for any stream: counting would read the whole corpus before the first batch (seqio asks,
        to cache small datasets in memory). Mixing rates give text corpora an artificial size; `count` reads."""
        return None

    def count(self, split: str) -> int:
        if split not in self._counted:  # streamed: a corpus of any size is counted in constant memory
            self._counted[split] = int(self._documents(split).reduce(0, lambda n, _: n + 1))
        return self._counted[split]

    def list_shards(self, split: str) -> list[str]:
        """One shard per file: a Beam cache job (`mtp cache`) reads the files in parallel, and processes that are
        at most as many as the files each read their own files (fewer are sharded per document by seqio)."""
        return [str(f) for f in self.files(split)]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        files = self.files(split)
        if shard_info and shard_info.num_shards > 1:  # seqio passes it only where there are at least as many files
            files = files[shard_info.index::shard_info.num_shards]
        documents = self._documents(split, files, shuffle, seed)
        if split == "train":
            self._check_has_documents(files)
        return documents.map(lambda text: {"text": text})

    def _check_has_documents(self, files: list[Path]) -> None:
        """A training corpus without one document (blank lines only) is an error naming its files, not an input
        pipeline that runs dry before the first step. Read in Python up to the first non-blank line (instant for
        any corpus that has one; the answer is kept per file list): reading the dataset itself here once shifted
        the random seeds of the first dataset a process built, so that a stage's data depended on what ran before
        it in the process."""
        key = tuple(map(str, files))
        if key not in self._has_documents:
            self._has_documents[key] = any(_has_text(path) for path in files)
        if not self._has_documents[key]:
            shown = ", ".join(key[:3]) + (f" and {len(key) - 3} more" if len(key) > 3 else "")
            raise ValueError(f"task {self._task_name}: its text files ({shown}) hold no document (only blank lines)")

    def _documents(self, split: str, files: list[Path] | None = None, shuffle_files: bool = False,
                   seed: int | None = None) -> tf.data.Dataset:
        files = self.files(split) if files is None else files
        for path in files:
            _check_is_text(path)
        ds = tf.data.Dataset.from_tensor_slices(([str(f) for f in files], [_is_wrapped_file(f) for f in files]))
        if shuffle_files and len(files) > 1:
            ds = ds.shuffle(len(files), seed=seed)
        held_out = split == "validation"
        return ds.flat_map(lambda path, wrapped: _file_documents(path, wrapped, held_out))


def _has_text(path: Path) -> bool:
    """Whether a text file has a line that is not blank."""
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


LINES_PER_BATCH = 1024  # lines handled together: per-line tf.data ops would make reading the bottleneck


def _file_documents(path: tf.Tensor, wrapped: tf.Tensor, held_out: bool) -> tf.data.Dataset:
    """One file's documents of one split, read in batches of lines: a scan carries the paragraph a batch ends in
    to the next (an empty line appended to the file closes the last one)."""
    lines = tf.data.TextLineDataset(path).concatenate(tf.data.Dataset.from_tensors(tf.constant("")))
    batches = lines.batch(LINES_PER_BATCH).map(_clean_lines)

    def step(carry, batch):
        carry, documents = tf.cond(wrapped, lambda: _paragraphs(carry, batch), lambda: (carry, batch))
        keep = tf.logical_and(tf.strings.length(documents) > 0,
                              tf.equal(tf.strings.to_hash_bucket_fast(documents, VALIDATION_BUCKETS) == 0, held_out))
        return carry, tf.boolean_mask(documents, keep)

    return batches.scan(tf.constant(""), step).unbatch()


def _paragraphs(carry: tf.Tensor, lines: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(the paragraph still open after `lines`, the paragraphs they close): a blank line ends a paragraph."""
    blank = tf.equal(lines, "")
    segment = tf.cumsum(tf.cast(blank, tf.int32), exclusive=True)
    closed = tf.reduce_sum(tf.cast(blank, tf.int32))
    joined = tf.strings.unsorted_segment_join(tf.concat([[carry], lines], 0), tf.concat([[0], segment], 0),
                                              closed + 1, separator=" ")
    joined = tf.strings.strip(tf.strings.regex_replace(joined, " +", " "))
    return joined[closed], joined[:closed]


def _clean_lines(lines: tf.Tensor) -> tf.Tensor:
    """Stripped lines; those that are not UTF-8 decoded as Latin-1."""
    valid = tf.equal(tf.strings.unicode_transcode(lines, "UTF-8", "UTF-8", errors="replace"), lines)
    latin1 = tf.strings.unicode_transcode(lines, "ISO-8859-1", "UTF-8")
    return tf.strings.strip(tf.where(valid, lines, latin1))


BINARY_SAMPLE_BYTES = 8000  # as git: a NUL byte in a file's first 8,000 bytes makes it binary
MAX_CONTROL_SHARE = 0.05  # control bytes (not tab, line ends or form feed) in the sample: text has none to speak of
_CONTROL = bytes([*range(0, 9), *range(14, 32), 127])


@functools.cache
def _check_is_text(path: Path) -> None:
    """Refuse a file that is not text (undecodable bytes would otherwise be read as Latin-1 without a word)."""
    with open(path, "rb") as f:
        head = f.read(BINARY_SAMPLE_BYTES)
    nul = head.find(b"\0")
    control = len(head) - len(head.translate(None, _CONTROL))
    if nul >= 0 or control > MAX_CONTROL_SHARE * len(head):
        why = f"a NUL byte at offset {nul}" if nul >= 0 else f"{control} control bytes in its first {len(head):,}"
        raise ValueError(f"{path}: not a text file ({why}); the text corpus reads plain-text files only")


def _is_wrapped_file(path: Path) -> bool:
    """Whether a file is laid out as BERT's pretraining text, from its first LAYOUT_SAMPLE_LINES lines."""
    with open(path, "rb") as f:
        lines = [line.strip() for line, _ in zip(f, range(LAYOUT_SAMPLE_LINES), strict=False)]
    sizes = sorted(len(line) for line in lines if line)
    return bool(sizes) and len(sizes) < len(lines) and sizes[len(sizes) // 2] < WRAPPED_LINE_CHARS
