"""The task catalogue on the real data: sizes, formats equal to the t5 package's, and bad input."""

from __future__ import annotations

import os

import pytest
import seqio
import tensorflow as tf
from conftest import mtp, mtp_here
from t5.data import preprocessors as t5p

import tasks  # noqa: F401
from mtplatform import catalog
from tasks import glue, sources
from tasks.sources import DataFormatError, FileSource

OFFICIAL_SIZES = {
    "glue_sst2": {"train": 67349, "validation": 872},
    "glue_cola": {"train": 8551, "validation": 1043},
    "glue_mrpc": {"train": 3668, "validation": 408},
    "glue_rte": {"train": 2490, "validation": 277},
    "glue_stsb": {"train": 5749, "validation": 1500},
    "glue_qnli": {"validation": 5463},
    "glue_wnli": {"train": 635, "validation": 71},
    "squad_v1": {"validation": 10570},
    "conll2003_ner": {"train": 14041, "validation": 3250},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZES))
def test_official_sizes(name, data_dir):
    task = seqio.get_mixture_or_task(name)
    for split, size in OFFICIAL_SIZES[name].items():
        assert len(task.source.read_rows(split)) == size
        assert task.num_input_examples(split) == size


def test_every_task_declares_sizes():
    from mtplatform import mixing

    for name in seqio.TaskRegistry.names():
        task = seqio.get_mixture_or_task(name)
        for split in task.splits:
            if name in mixing.UNSUPERVISED_TASKS:  # streamed corpora: size unknown, rates use an artificial one
                assert task.num_input_examples(split) is None, (name, split)
            else:
                assert task.num_input_examples(split) > 0, (name, split)


def test_squad_devsplit_is_by_article(data_dir):
    source = seqio.get_mixture_or_task("squad_v1_devsplit").source
    train, validation = source.read_rows("train"), source.read_rows("validation")
    assert len(train) + len(validation) == 10570
    assert (len(train), len(validation)) == (9189, 1381)
    assert not {r["title"] for r in train} & {r["title"] for r in validation}


def _pretokenized(name: str, split: str, n: int | None = None) -> list[dict]:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(None, split=split, shuffle=False, use_cached=False)
    if n:
        ds = ds.take(n)
    return list(ds.as_numpy_iterator())


def _t5_format(name: str, split: str) -> list[tuple[str, str]]:
    """The t5 package's GLUE preprocessor applied to the same rows (in TFDS layout)."""
    task = seqio.get_mixture_or_task(name)
    config = glue._CONFIGS[glue.SPECS[name.removeprefix("glue_")].config]
    prep = glue.glue_utils.get_glue_text_preprocessor(config)
    ds = prep(task.source.get_dataset(split=split, shuffle=False))
    return [(x["inputs"].decode(), x["targets"].decode()) for x in ds.as_numpy_iterator()]


@pytest.mark.parametrize(
    "name", ["glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_qnli", "glue_rte", "glue_wnli"])
def test_glue_format_equals_t5(name, data_dir, vocab_file):
    ours = [(x["inputs_pretokenized"].decode(), x["targets_pretokenized"].decode())
            for x in _pretokenized(name, "validation")]
    assert ours == _t5_format(name, "validation")


def test_glue_format_by_hand(data_dir, vocab_file):
    # Independent of t5: benchmark prefix, feature keys sorted by name, label names, STS-B rounded to 0.2.
    rte = _pretokenized("glue_rte", "validation", 1)[0]
    assert rte["inputs_pretokenized"].decode() == (
        "rte sentence1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation. sentence2: Christopher Reeve had an accident."
    )
    assert rte["targets_pretokenized"] == b"not_entailment"
    qnli = _pretokenized("glue_qnli", "validation", 1)[0]
    assert qnli["inputs_pretokenized"].decode().startswith(
        "qnli question: What came into force after the new constitution was herald? sentence: As of that day")
    assert qnli["targets_pretokenized"] == b"entailment"
    mrpc = _pretokenized("glue_mrpc", "train", 1)[0]
    assert mrpc["inputs_pretokenized"].decode().startswith("mrpc sentence1: Amrozi accused his brother")
    assert mrpc["targets_pretokenized"] == b"equivalent"
    scores = [float(line.split("\t")[-1]) for line in
              (data_dir / "glue/STS-B/dev.tsv").read_text().splitlines()[1:]]
    stsb = _pretokenized("glue_stsb", "validation")
    assert [x["targets_pretokenized"].decode() for x in stsb] == [f"{round(s * 5) / 5:.1f}" for s in scores]
    cola = _pretokenized("glue_cola", "train", 2)
    assert [x["targets_pretokenized"] for x in cola] == [b"acceptable", b"acceptable"]
    assert cola[0]["inputs_pretokenized"].decode() == (
        "cola sentence: Our friends won't buy this analysis, let alone the next one we propose.")


def test_qnli_stray_quotes_are_text(data_dir):
    rows = seqio.get_mixture_or_task("glue_qnli").source.read_rows("validation")
    quoted = [r for r in rows if r["sentence"].startswith('"') or r["question"].startswith('"')]
    assert len(quoted) >= 5
    assert len(rows) == 5463


MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def _write_glue(root, directory, name, lines):
    path = root / "glue" / directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mnli_and_qqp_readers_on_official_layout(tmp_path, monkeypatch, vocab_file):
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    _write_glue(tmp_path, "MNLI", "dev_matched.tsv", [
        MNLI_HEADER,
        '0\t31193\t31193n\tgovernment\t( ( x ) )\t( ( y ) )\t(ROOT x)\t(ROOT y)\tConceptually "cream" skimming '
        'has two basic dimensions.\tProduct and geography are what make cream skimming work.\tneutral\tcontradiction'
        '\tneutral\tneutral\tneutral\tneutral',
        "1\t101457\t101457e\ttelephone\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tyou know during the season\tYou lose the "
        "things.\tentailment\tentailment\tentailment\tentailment\tentailment\tentailment",
    ])
    _write_glue(tmp_path, "QQP", "dev.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0",
        "263843\t69383\t380476\tI want to pursue PhD in Computer Science?\tI handle social media?\t1",
    ])
    mnli = _pretokenized("glue_mnli", "validation")
    assert [x["inputs_pretokenized"].decode() for x in mnli] == [
        'mnli hypothesis: Product and geography are what make cream skimming work. premise: Conceptually "cream" '
        "skimming has two basic dimensions.",
        "mnli hypothesis: You lose the things. premise: you know during the season",
    ]
    assert [x["targets_pretokenized"] for x in mnli] == [b"neutral", b"entailment"]
    assert [x["inputs_pretokenized"] for x in mnli] == [x[0].encode() for x in _t5_format("glue_mnli", "validation")]
    qqp = _pretokenized("glue_qqp", "validation")
    assert qqp[0]["inputs_pretokenized"].decode() == (
        "qqp question1: Why are African-Americans so beautiful? question2: Why are hispanics so beautiful?")
    assert [x["targets_pretokenized"] for x in qqp] == [b"not_duplicate", b"duplicate"]


def test_missing_file_names_task_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"glue_rte.*'train'.*glue/RTE/train\.tsv"):
        seqio.get_mixture_or_task("glue_rte").source.read_rows("train")


def test_malformed_rows_name_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    path = _write_glue(tmp_path, "RTE", "dev.tsv", [
        "index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb", "2\ta\tb\tentailment"])
    with pytest.raises(DataFormatError, match=rf"{path}:3: expected 4 tab-separated fields"):
        seqio.get_mixture_or_task("glue_rte").source.read_rows("validation")
    _write_glue(tmp_path, "RTE", "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(DataFormatError, match=rf"{path}:2: label 'maybe'"):
        seqio.get_mixture_or_task("glue_rte").source.read_rows("validation")
    conll = tmp_path / "conll2003" / "eng.testa"
    conll.parent.mkdir()
    conll.write_text("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ\n")
    with pytest.raises(DataFormatError, match=rf"{conll}:4: expected 4 space-separated fields"):
        seqio.get_mixture_or_task("conll2003_ner").source.read_rows("validation")


def test_pretokenized_reads_in_batches_in_file_order(data_dir):
    """`catalog.pretokenized` takes READ_BATCH examples from tf.data at a time and hands them over one by one in
    file order: SST-2's first 2,500 training texts, across two batch boundaries, are its rows' sentences and
    labels, with their ids."""
    task = seqio.get_mixture_or_task("glue_sst2")
    rows = task.source.read_rows("train")[:2500]
    got = list(catalog.pretokenized(task, "train", 2500))
    assert len(got) == 2500 > 2 * catalog.READ_BATCH
    assert [ex["inputs"].decode() for ex in got] == [f"sst2 sentence: {row['sentence']}" for row in rows]
    assert [ex["targets"].decode() for ex in got] == [("negative", "positive")[row["label"]] for row in rows]
    assert [int(ex["idx"]) for ex in got] == list(range(2500))


def test_a_split_is_parsed_once_per_version_of_its_files(tmp_path, monkeypatch):
    """A task's pipeline built again (an experiment's next stage) reuses the columns its files were parsed into,
    until a file's bytes change, even to the same size and modification time: then the new rows are served."""
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    header = "index\tsentence1\tsentence2\tlabel"
    _write_glue(tmp_path, "RTE", "dev.tsv", [header, "0\ta\tb\tentailment", "1\tc\td\tnot_entailment"])
    source = seqio.get_mixture_or_task("glue_rte").source

    def premises() -> list[bytes]:
        return [ex["sentence1"] for ex in source.get_dataset("validation", shuffle=False).as_numpy_iterator()]

    assert premises() == [b"a", b"c"]
    parsed = source._columns("validation")
    assert premises() == [b"a", b"c"] and source._columns("validation") is parsed
    path = _write_glue(tmp_path, "RTE", "dev.tsv", [header, "0\te\tf\tentailment", "1\tg\th\tentailment",
                                                    "2\ti\tj\tnot_entailment"])
    assert premises() == [b"e", b"g", b"i"] and source._columns("validation") is not parsed
    before = path.stat()
    _write_glue(tmp_path, "RTE", "dev.tsv", [header, "0\tx\tf\tentailment", "1\tg\th\tentailment",
                                             "2\ti\tj\tnot_entailment"])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a coarse clock leaves a quick rewrite
    assert path.stat().st_size == before.st_size and premises() == [b"x", b"g", b"i"]


def test_conll_columns_equal_tf_ragged_constant(data_dir):
    """CoNLL's token and tag lists become the ragged tensors `tf.ragged.constant` makes of them (built from flat
    values and row lengths instead, some 20 times as fast)."""
    rows = seqio.get_mixture_or_task("conll2003_ner").source.read_rows("validation")
    columns = sources._as_columns(rows)
    for key in ("tokens", "tags"):
        expected = tf.ragged.constant([row[key] for row in rows], dtype=tf.string)
        assert columns[key].row_splits.dtype == expected.row_splits.dtype == tf.int64
        assert columns[key].to_list() == expected.to_list()
    assert len(rows) == 3250 and columns["tokens"].flat_values.shape[0] > 50_000


def test_unknown_split_and_task_are_named():
    with pytest.raises(ValueError, match="glue_rte has no split 'dev'"):
        seqio.get_mixture_or_task("glue_rte").source.files("dev")
    with pytest.raises(ValueError, match="no task or mixture named 'glue_nope'"):
        catalog.tasks_of("glue_nope")


def test_text_corpus_quirks_are_read(data_dir):
    source = seqio.get_mixture_or_task("span_corruption").source
    files = source.files("train")
    names = {f.name for f in files}
    assert {"shakespeare-caesar.txt", "melville-moby_dick.txt", "valid.txt"} <= names
    lines = [r["text"] for r in source.read_rows("train")]
    assert not [line for line in lines if "\r" in line]
    assert source.count("train") == len(lines) > 20_000  # paragraphs of the wrapped books, lines of the rest
    assert source.count("validation") == len(source.read_rows("validation")) > 150  # about 1%
    assert source.num_input_examples("train") is None  # a stream: seqio must not count it before the first batch


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_every_task_tokenizes(data_dir, vocab_file):
    lengths = {"inputs": 128, "targets": 128}
    for name in sorted(seqio.TaskRegistry.names()):
        task = seqio.get_mixture_or_task(name)
        try:
            task.source.files("train")
        except FileNotFoundError:
            continue  # MNLI, QQP, QNLI train and SQuAD train are not in the shared data
        ex = next(task.get_dataset(lengths, split="train", shuffle=False, use_cached=False, seed=1)
                  .as_numpy_iterator())
        assert ex["targets"][-1] == 1 and 0 < len(ex["targets"]) <= 128, name  # ends with EOS
        assert "inputs" in ex and len(ex["inputs"]) > 0, name


# --- unsupervised objectives ---------------------------------------------------------------------------------


def _vocab():
    return seqio.get_mixture_or_task("span_corruption").output_features["targets"].vocabulary


# --- vocabulary and CLI --------------------------------------------------------------------------------------


def test_vocabulary_ids(vocab_file):
    from mtplatform.vocab import vocabulary_from_file

    vocab = vocabulary_from_file(vocab_file)
    assert vocab.vocab_size == 4000
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 3900  # seqio appends the 100 sentinels
    assert vocab.decode([3999]) == "<extra_id_0>" and vocab.decode([3900]) == "<extra_id_99>"
    ids = vocab.encode("The sailors rode the breeze clear of the rocks.")
    assert vocab.decode(ids) == "The sailors rode the breeze clear of the rocks."
    assert _vocab().vocab_size == 4000  # the tasks use the configured file


def test_missing_vocabulary_is_explained(tmp_path, monkeypatch):
    from mtplatform.vocab import ConfiguredVocabulary

    monkeypatch.setenv("MTP_VOCAB", str(tmp_path / "none.model"))
    with pytest.raises(FileNotFoundError, match="mtp vocab train"):
        ConfiguredVocabulary().encode("hello")


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_cli_tasks_list(data_dir):
    out = mtp("tasks", "list")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "train 67,349, validation 872" in lines["glue_sst2"]
    assert "train 14,041, validation 3,250" in lines["conll2003_ner"]
    # Counts are what the files hold; a split whose file is absent says so instead of an official count.
    assert "train missing, validation 5,463" in lines["glue_qnli"] and "train: missing file " in lines["glue_qnli"]
    assert "glue/QNLI/train.tsv" in lines["glue_qnli"]
    assert "matthews_corrcoef" in lines["glue_cola"]
    for name in ("glue_mnli", "glue_qqp", "squad_v1_devsplit", "span_corruption", "bert_mlm", "prefix_lm"):
        assert name in lines
    mixtures = out.stdout.split("mixtures: ", 1)[1].split(", ")
    assert {"glue", "supervised", "leave_one_out_glue_rte", "leave_one_out_squad_v1", "span_corruption_and_glue"} \
        <= {m.strip() for m in mixtures}


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_cli_vocab_train_then_show(tmp_path, data_dir):
    model = tmp_path / "v.model"
    out = mtp("vocab", "train", "--mixture_or_task=glue_rte", "--vocab_size=1200", f"--output={model}")
    assert out.returncode == 0, out.stderr
    assert str(model) in out.stdout and model.is_file()
    out = mtp("tasks", "show", "--mixture_or_task=glue_rte", "--split=validation", env_extra={"MTP_VOCAB": str(model)})
    assert out.returncode == 0, out.stderr
    assert "inputs text:   rte sentence1: Dana Reeve" in out.stdout
    assert "targets text:   not_entailment" in out.stdout


def test_cli_bad_data_dir_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path / "nowhere"))
    code = mtp_here("tasks", "show", "--mixture_or_task=glue_rte")
    err = capsys.readouterr().err
    assert code == 2
    assert "MTP_DATA_DIR" in err and "Traceback" not in err


def _sst2_rows(data_dir, split: str, n: int) -> list[dict]:
    lines = (data_dir / "glue" / "SST-2" / f"{split}.tsv").read_text().splitlines()[1:n + 1]
    return [{"sentence": line.split("\t")[0], "label": int(line.split("\t")[1])} for line in lines]


@pytest.mark.slow  # the default suite's 15-minute budget (19.5 min on an AVX2 CPU without it)
def test_readme_file_task_example(tmp_path, data_dir, vocab_file):
    """The README's "Your own tasks" example, run as written, on SST-2 rows written as a user's CSV and JSON lines."""
    import csv
    import json
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("<!-- my_tasks.py -->\n```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    (tmp_path / "my_tasks.py").write_text(code)
    reviews = tmp_path / "data" / "reviews"
    reviews.mkdir(parents=True)
    with open(reviews / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["sentence", "label"])
        writer.writeheader()
        writer.writerows(_sst2_rows(data_dir, "train", 500))
    dev = _sst2_rows(data_dir, "dev", 300)
    for part in (0, 1):
        (reviews / f"dev-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev[part::2]))
    env = {"PYTHONPATH": str(tmp_path), "MTP_VOCAB": str(vocab_file), "MTP_DATA_DIR": str(tmp_path / "data")}
    out = mtp("tasks", "show", "--module", "my_tasks", "--mixture_or_task=my_reviews", "--split=validation",
              cwd=tmp_path, env_extra=env)
    assert out.returncode == 0, out.stderr
    first = dev[0]["sentence"].strip()
    assert f"inputs text:   review: {first}" in out.stdout
    assert f"targets text:   {'positive' if dev[0]['label'] else 'negative'}" in out.stdout
    out = mtp("tasks", "list", "--module", "my_tasks", cwd=tmp_path, env_extra=env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("my_reviews"))
    assert "train 500, validation 300" in line and "accuracy" in line


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_file_tasks_read_every_format(tmp_path, monkeypatch, data_dir, vocab_file, fmt):
    import json

    import pandas as pd

    from tasks.files import register_file_task

    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    rows = _sst2_rows(data_dir, "dev", 200)
    frame = pd.DataFrame(rows)
    path = tmp_path / f"sst.{fmt}"
    {"tsv": lambda: frame.to_csv(path, sep="\t", index=False), "csv": lambda: frame.to_csv(path, index=False),
     "jsonl": lambda: path.write_text("".join(json.dumps(r) + "\n" for r in rows)),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    task = register_file_task(f"my_sst_{fmt}", {"validation": f"sst.{fmt}"}, inputs="sst2 sentence: {sentence}",
                              targets=lambda row: ("negative", "positive")[int(row["label"])])
    try:
        assert task.num_input_examples("validation") == 200
        ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
        assert ex["inputs_pretokenized"].decode() == f"sst2 sentence: {rows[0]['sentence']}"
        assert ex["targets_pretokenized"].decode() == ("negative", "positive")[rows[0]["label"]]
    finally:
        seqio.TaskRegistry.remove(f"my_sst_{fmt}")


@pytest.mark.parametrize("fmt,content,error", [
    ("csv", "sentence,label\ngood film,1\nbad,film,0\n", r"bad\.csv:3: expected 2 comma-separated fields"),
    ("tsv", "sentence\tlabel\ngood film\t1\nbad film\n", r"bad\.tsv:3: expected 2 tab-separated fields"),
    ("jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n', r"bad\.jsonl:2: not a JSON"),
    ("jsonl", '{"sentence": "good", "label": 1}\n{"text": "bad", "label": 0}\n',
     r"bad\.jsonl:2: inputs needs column 'sentence'; the row has text, label"),
    ("parquet", "not parquet", r"bad\.parquet: not a readable Parquet file"),
])
def test_malformed_rows_of_file_tasks_name_file_and_line(tmp_path, monkeypatch, fmt, content, error):
    from tasks.files import register_file_task

    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    (tmp_path / f"bad.{fmt}").write_text(content)
    task = register_file_task("my_bad", {"train": f"bad.{fmt}"}, inputs="s: {sentence}", targets="{label}")
    try:
        with pytest.raises(DataFormatError, match=error):
            task.source.read_rows("train")
    finally:
        seqio.TaskRegistry.remove("my_bad")


def test_missing_files_of_file_tasks_are_named(tmp_path, monkeypatch):
    from tasks.files import register_file_task

    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    task = register_file_task("my_absent", {"train": "nowhere/*.csv"}, inputs="{a}", targets="{b}")
    try:
        with pytest.raises(FileNotFoundError, match=r"task my_absent, split 'train': expected data file "
                                                     r"nowhere/\*\.csv under"):
            task.source.files("train")
    finally:
        seqio.TaskRegistry.remove("my_absent")


def test_file_source_counts_undeclared_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path))
    (tmp_path / "f.txt").write_text("a\nb\n")
    source = FileSource("t", {"train": "f.txt"}, reader=lambda p, s: [{"text": x} for x in p.read_text().split()])
    assert source.num_input_examples("train") == 2
    assert isinstance(source.get_dataset("train"), tf.data.Dataset)


def test_t5_glue_preprocessor_is_the_one_used():
    # Guard against silently drifting from t5's formatting: the GLUE tasks' first step is t5's preprocessor.
    step = seqio.get_mixture_or_task("glue_rte").preprocessors[0]
    assert step.func is t5p.glue and step.keywords["benchmark_name"] == "rte"
