"""Each pretraining objective measured on the real corpus against its definition.

Tolerances are four standard deviations of the measured share at the sample size drawn (stated at each assert),
so a correct objective fails about once in 15,000 runs; noise counts are exact by construction and asserted so.
"""

from __future__ import annotations

import math
import re

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401
from tasks import objectives

LENGTHS = {"inputs": 128, "targets": 128}
EOS = 1


def _vocab():
    return seqio.get_mixture_or_task("span_corruption").output_features["targets"].vocabulary


def _examples(name: str, n: int, lengths=LENGTHS, seed: int = 7) -> list[dict]:
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=False, use_cached=False,
                                                     seed=seed)
    return [{k: v[:-1] if v.dtype != object and v[-1] == EOS else v for k, v in ex.items()}  # EOS dropped
            for ex in ds.take(n).as_numpy_iterator()]


def _applied(objective, n: int, seed: int = 11, lengths=LENGTHS, **params) -> list[dict]:
    """`objective` with explicit parameters over the tokenized corpus, without EOS."""
    task = seqio.get_mixture_or_task("span_corruption")
    ds = task.source.get_dataset("train", shuffle=False)
    ds = seqio.preprocessors.rekey(ds, {"inputs": None, "targets": "text"})
    ds = seqio.preprocessors.tokenize(ds, task.output_features)
    with seqio.utils.map_seed_manager(seed):
        ds = objective(ds, lengths, task.output_features, **params)
    return list(ds.take(n).as_numpy_iterator())


def _tolerance(p: float, n: int) -> float:
    """Four standard deviations of a share p measured over n independent draws."""
    return 4 * math.sqrt(p * (1 - p) / n)


def _word_ids(tokens: np.ndarray) -> np.ndarray:
    return objectives.word_ids(tf.constant(tokens), objectives.piece_table(_vocab(), "word_start")).numpy()


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _is_subsequence(short, long) -> bool:
    it = iter(long.tolist())
    return all(t in it for t in short.tolist())


# --- T5's objectives -----------------------------------------------------------------------------------------


def test_span_corruption_density_and_sentinels(data_dir, vocab_file):
    first_sentinel = _vocab().vocab_size - 1  # <extra_id_0>
    noise = total = n_spans = 0
    for ex in _examples("span_corruption", 50, {"inputs": 512, "targets": 114}, seed=3):
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        in_sent = [t for t in inputs if t > first_sentinel - 100]
        tgt_sent = [t for t in targets if t > first_sentinel - 100]
        n = len(in_sent)
        assert n > 0 and in_sent == tgt_sent == list(range(first_sentinel, first_sentinel - n, -1))
        assert targets[0] == first_sentinel
        spans, cur = {}, None  # each input sentinel stands for the target span after the same sentinel
        for t in targets:
            if t in tgt_sent:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        noise += sum(len(s) for s in spans.values())
        total += len(inputs) - n + sum(len(s) for s in spans.values())
        n_spans += n
    assert noise / total == pytest.approx(0.15, abs=0.01)  # exact per example up to rounding
    assert noise / n_spans == pytest.approx(3.0, abs=0.3)  # mean noise span length


@pytest.mark.parametrize("density,span", [(0.5, 3.0), (0.15, 10.0)])
def test_span_corruption_settings_take_effect_from_gin(data_dir, vocab_file, density, span):
    """T5 Tables 6 and 7's knobs, bound as a run's gin file binds them, change the examples built afterwards."""
    first_sentinel = _vocab().vocab_size - 1
    with gin.unlock_config():
        gin.bind_parameter("objectives.span_corruption.noise_density", density)
        gin.bind_parameter("objectives.span_corruption.mean_noise_span_length", span)
    try:
        examples = _examples("span_corruption", 30, {"inputs": 256, "targets": 256})
    finally:
        with gin.unlock_config():
            gin.bind_parameter("objectives.span_corruption.noise_density", 0.15)
            gin.bind_parameter("objectives.span_corruption.mean_noise_span_length", 3.0)
    spans = sum(int((ex["inputs"] > first_sentinel - 100).sum()) for ex in examples)
    noise = sum(len(ex["targets"]) for ex in examples) - spans
    total = sum(len(ex["inputs"]) for ex in examples) - spans + noise
    assert noise / total == pytest.approx(density, abs=0.01)
    assert noise / spans == pytest.approx(span, rel=0.1)


def test_span_corruption_refuses_a_target_length_that_would_cut(data_dir, vocab_file):
    with pytest.raises(ValueError, match=r"objective span_corruption .*inputs length 512 needs targets length 114, "
                                         r"TASK_FEATURE_LENGTHS gives 64"):
        _examples("span_corruption", 1, {"inputs": 512, "targets": 64})


def test_iid_objectives_have_exact_noise_counts(data_dir, vocab_file):
    """Replace corrupted spans and drop corrupted tokens (T5 Table 5): exactly round(15%) of each chunk's tokens."""
    first_sentinel = _vocab().vocab_size - 1
    for ex in _examples("iid_denoising", 40):
        runs_in = int((ex["inputs"] > first_sentinel - 100).sum())
        runs_out = int((ex["targets"] > first_sentinel - 100).sum())
        noise = len(ex["targets"]) - runs_out
        assert abs(runs_in - runs_out) <= 1  # a sentinel per noise run in the inputs, per clean run in the target
        assert noise == round(0.15 * (len(ex["inputs"]) - runs_in + noise))
    for ex in _examples("drop_corrupted_tokens", 40):
        n = len(ex["inputs"]) + len(ex["targets"])
        assert len(ex["targets"]) == round(0.15 * n) and not (ex["inputs"] > first_sentinel - 100).any()


def test_iid_denoising_never_runs_out_of_sentinels(data_dir, vocab_file):
    """At 50% noise a 511-token chunk would need about 128 sentinels; there are 100, so the chunk is cut shorter."""
    vocab = _vocab()
    examples = _applied(objectives.iid_denoising, 10, lengths={"inputs": 512, "targets": 512}, noise_density=0.5)
    for ex in examples:
        noise = len(ex["targets"]) - int((ex["targets"] >= vocab.vocab_size - 100).sum())
        assert noise <= 100 and int((ex["inputs"] >= vocab.vocab_size - 100).sum()) <= 100


def test_deshuffling_and_prefix_lm(data_dir, vocab_file):
    shuffled = 0
    for ex in _examples("deshuffling", 40):
        assert sorted(ex["inputs"].tolist()) == sorted(ex["targets"].tolist())  # every token, once
        shuffled += not np.array_equal(ex["inputs"], ex["targets"])
    assert shuffled >= 39
    first_sentinel = _vocab().vocab_size - 1
    for ex in _examples("prefix_lm", 20):
        assert not (ex["inputs"] > first_sentinel - 100).any()  # plain prefix and continuation
        assert len(ex["inputs"]) >= 1 and len(ex["targets"]) >= 1


# --- BERT, whole words, SpanBERT -----------------------------------------------------------------------------


def test_bert_mlm_80_10_10(data_dir, vocab_file):
    mask = _vocab().vocab_size - 1
    masked = randomised = noise = tokens = 0
    for ex in _examples("bert_mlm", 200):
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) == len(targets)  # the target is the original text, token for token
        k = round(0.15 * len(targets))
        m, r = int((inputs == mask).sum()), int(((inputs != targets) & (inputs != mask)).sum())
        assert m + r <= k  # the other chosen tokens stayed as they were
        masked, randomised, noise, tokens = masked + m, randomised + r, noise + k, tokens + len(targets)
    assert noise / tokens == pytest.approx(0.15, abs=0.002)  # exact per chunk, up to rounding
    assert masked / noise == pytest.approx(0.8, abs=_tolerance(0.8, noise))  # ~3,800 noise tokens: +-0.026
    assert randomised / noise == pytest.approx(0.1, abs=_tolerance(0.1, noise))


def test_whole_word_masking_masks_whole_words(data_dir, vocab_file):
    mask = _vocab().vocab_size - 1
    chosen = tokens = 0
    for ex in _applied(objectives.bert_mlm_wwm, 150, mask_prob=1.0, random_prob=0.0):
        inputs, targets = ex["inputs"], ex["targets"]
        words = _word_ids(targets)
        for w in np.unique(words[inputs == mask]):
            assert (inputs[words == w] == mask).all(), "a word was masked in part"
        chosen, tokens = chosen + int((inputs == mask).sum()), tokens + len(targets)
    # ~19,000 tokens in ~14,000 words: the word-level draw's share is within 4 sd (about 0.012) of 15%.
    assert chosen / tokens == pytest.approx(0.15, abs=0.012)
    # With BERT's default 80/10/10 the masked share of tokens is 80% of that.
    examples = _examples("bert_mlm_wwm", 150)
    masked = sum(int((ex["inputs"] == mask).sum()) for ex in examples) / sum(len(ex["targets"]) for ex in examples)
    assert masked == pytest.approx(0.12, abs=0.012)


def _truncated_geometric(p: float, max_length: int) -> np.ndarray:
    probs = p * (1 - p) ** np.arange(max_length)
    return probs / probs.sum()


def _reference_spans(draw, budget: int, rng: np.random.Generator) -> list[int]:
    """The definition, written independently: draw span lengths until they cover `budget`, the last cut to fit."""
    spans: list[int] = []
    while sum(spans) < budget:
        spans.append(min(int(draw(rng)), budget - sum(spans)))
    return spans


def _assert_same_distribution(observed: list[int], reference: list[int], bins: int) -> None:
    seen = np.bincount(observed, minlength=bins)[:bins] / len(observed)
    expected = np.bincount(reference, minlength=bins)[:bins] / len(reference)
    for length in range(bins):
        tolerance = _tolerance(expected[length], len(observed)) + 1e-9
        assert seen[length] == pytest.approx(expected[length], abs=tolerance), f"span length {length}"
    assert np.mean(observed) == pytest.approx(np.mean(reference), abs=4 * np.std(reference) / len(observed) ** .5)


def test_spanbert_span_lengths_follow_the_clipped_geometric(data_dir, vocab_file):
    """Spans of whole words whose lengths are drawn from SpanBERT's geometric (p 0.2, clipped at 10: mean 3.8)
    until 15% of the words are covered, the last cut to the budget: compared with that process simulated."""
    mask = _vocab().vocab_size - 1
    geometric = _truncated_geometric(0.2, 10)
    rng = np.random.default_rng(0)
    observed, reference, covered, words_seen = [], [], 0, 0
    for ex in _applied(objectives.spanbert, 250, mask_prob=1.0, random_prob=0.0):
        inputs, targets = ex["inputs"], ex["targets"]
        words = _word_ids(targets)
        masked_words = np.zeros(words[-1] + 1, dtype=bool)
        masked_words[words[inputs == mask]] = True
        for w in np.flatnonzero(masked_words):
            assert (inputs[words == w] == mask).all(), "a word was masked in part"
        observed += [end - start for start, end in _runs(masked_words)]
        budget = round(0.15 * len(masked_words))
        assert masked_words.sum() == budget  # 15% of the words, exactly
        for _ in range(20):
            reference += _reference_spans(lambda r: r.choice(10, p=geometric) + 1, budget, rng)
        covered, words_seen = covered + budget, words_seen + len(masked_words)
    assert len(observed) > 800 and max(observed) <= 10
    _assert_same_distribution(observed, reference, bins=11)
    assert float(np.arange(1, 11) @ geometric) == pytest.approx(3.8, abs=0.05)  # the paper's mean span length


def test_spanbert_applies_80_10_10_per_span(data_dir, vocab_file):
    mask = _vocab().vocab_size - 1
    spans_seen = mixed = 0
    for ex in _examples("spanbert", 150):
        inputs, targets = ex["inputs"], ex["targets"]
        words = _word_ids(targets)
        changed = inputs != targets
        for start, end in _runs(inputs == mask):
            spans_seen += 1
            # A masked span is masked whole: no token of the words it touches was randomised or kept.
            touched = np.isin(words, np.unique(words[start:end]))
            mixed += bool((touched & changed & (inputs != mask)).any() or (inputs[touched] != mask).any())
    assert spans_seen > 200 and mixed == 0


# --- BART ----------------------------------------------------------------------------------------------------


def test_bart_infilling_masks_exactly_the_budget(data_dir, vocab_file):
    mask = _vocab().vocab_size - 1
    for ex in _examples("bart_infilling", 60):
        inputs, targets = ex["inputs"], ex["targets"]
        spans = int((inputs == mask).sum())
        assert len(targets) - (len(inputs) - spans) == round(0.3 * len(targets))  # 30% of tokens covered
        assert _is_subsequence(inputs[inputs != mask], targets)


def test_bart_infilling_span_lengths_are_poisson(data_dir, vocab_file):
    """The sampler the objective uses, at the corpus's chunk length: lengths Poisson(3), zero included (an
    insertion), drawn until 30% of the tokens are covered, spans placed apart; compared with that process
    simulated."""
    n, budget, observed, reference = 127, round(0.3 * 127), [], []
    rng = np.random.default_rng(0)
    for seed in range(300):
        sampled = tf.random.stateless_poisson([n], [seed, 1], lam=3.0, dtype=tf.int32)
        spans = objectives.budgeted_spans(sampled, objectives.num_noise(n, 0.3), max_spans=n - budget - 1)
        noise, _, starts = objectives.place_spans(n, spans, tf.constant([seed, 2]))
        assert int(tf.reduce_sum(spans)) == int(tf.reduce_sum(tf.cast(noise, tf.int32))) == budget
        assert (np.diff(starts.numpy()) > spans.numpy()[:-1]).all()  # a clean token between two spans
        observed += spans.numpy().tolist()
        for _ in range(10):
            reference += _reference_spans(lambda r: r.poisson(3.0), budget, rng)
    assert observed.count(0) > 100  # insertions happen
    _assert_same_distribution(observed, reference, bins=10)


def test_bart_token_masking_and_deletion(data_dir, vocab_file):
    mask = _vocab().vocab_size - 1
    for ex in _examples("bart_token_masking", 40):
        assert int((ex["inputs"] == mask).sum()) == round(0.3 * len(ex["targets"]))
        assert np.array_equal(ex["inputs"][ex["inputs"] != mask], ex["targets"][ex["inputs"] != mask])
    for ex in _examples("bart_token_deletion", 40):
        assert len(ex["targets"]) - len(ex["inputs"]) == round(0.3 * len(ex["targets"]))  # deletion removes
        assert _is_subsequence(ex["inputs"], ex["targets"])  # and nothing else changes


def _sentences(tokens: np.ndarray) -> list[list[int]]:
    ends = objectives.piece_table(_vocab(), "sentence_end").numpy()[tokens]
    return [s.tolist() for s in np.split(tokens, np.flatnonzero(ends) + 1) if len(s)]


def _is_reordering(inputs: list[int], sentences: list[list[int]]) -> bool:
    """Whether `inputs` is `sentences` laid end to end in some order (depth-first over the choices)."""
    if not sentences:
        return not inputs
    return any(inputs[:len(s)] == s and _is_reordering(inputs[len(s):], sentences[:i] + sentences[i + 1:])
               for i, s in enumerate(sentences))


def test_bart_sentence_permutation_keeps_every_sentence(data_dir, vocab_file):
    permuted = several = 0
    for ex in _examples("bart_sentence_permutation", 80):
        sentences = _sentences(ex["targets"])
        assert _is_reordering(ex["inputs"].tolist(), sentences)  # the same sentences, every token kept
        if len(sentences) > 1:
            several += 1
            permuted += not np.array_equal(ex["inputs"], ex["targets"])
    assert several > 30 and permuted / several > 0.4


def test_bart_document_rotation_is_a_rotation(data_dir, vocab_file):
    starts = []
    for ex in _examples("bart_document_rotation", 80):
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        doubled = targets + targets
        offsets = [i for i in range(len(targets)) if doubled[i:i + len(targets)] == inputs]
        assert offsets, "the inputs are not a rotation of the document"
        starts.append(offsets[0] / len(targets))
    assert np.mean(starts) == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / len(starts)))  # uniform start


# --- next-sentence prediction ---------------------------------------------------------------------------------


def test_nsp_pairs_and_label_balance(data_dir, vocab_file):
    task = seqio.get_mixture_or_task("nsp")
    ds = task.get_dataset(LENGTHS, split="train", shuffle=False, use_cached=False, seed=4).take(1500)
    vocab = task.output_features["targets"].vocabulary
    documents = [row["text"] for row in task.source.read_rows("train")]
    corpus = re.sub(r"\s+", " ", "\n".join(documents))
    labels = []
    for ex in ds.as_numpy_iterator():
        text = ex["inputs_pretokenized"].decode()
        label = ex["targets_pretokenized"].decode()
        assert vocab.decode(ex["targets"][:-1].tolist()) == label and label in objectives.NSP_LABELS
        first, second = (re.sub(r"\s+", " ", s) for s in text.removeprefix("nsp sentence1: ").split(" sentence2: "))
        labels.append(label)
        if len(labels) <= 300 and (label == "next" or len(second) > 30):
            # The positive pair is in a document as it is; a negative pair (save a short chance match) in none.
            assert (f"{first} {second}" in corpus) == (label == "next"), (label, first, second)
    share = labels.count("next") / len(labels)
    assert share == pytest.approx(0.5, abs=_tolerance(0.5, len(labels)))  # 1,500 pairs: +-0.052


def test_sentences_are_split_after_full_stops(data_dir):
    text = 'He left. "Why?" she asked. Mr. Smith and H. G. Wells stayed! (Then) quiet.'
    split = objectives.split_sentences(tf.constant(text))
    assert [s.decode() for s in split.numpy()] == ["He left.", '"Why?" she asked.',
                                                  "Mr. Smith and H. G. Wells stayed!", "(Then) quiet."]


def test_sop_pairs_are_consecutive_sentences_of_one_document_in_or_out_of_order(data_dir, vocab_file):
    task = seqio.get_mixture_or_task("albert_sop")
    ds = task.get_dataset(LENGTHS, split="train", shuffle=False, use_cached=False, seed=4).take(1500)
    vocab = task.output_features["targets"].vocabulary
    corpus = re.sub(r"\s+", " ", "\n".join(row["text"] for row in task.source.read_rows("train")))
    labels = []
    for ex in ds.as_numpy_iterator():
        text, label = ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()
        assert vocab.decode(ex["targets"][:-1].tolist()) == label and label in objectives.SOP_LABELS
        first, second = (re.sub(r"\s+", " ", s) for s in text.removeprefix("sop sentence1: ").split(" sentence2: "))
        labels.append(label)
        if len(labels) <= 300:
            in_order = (first, second) if label == "in_order" else (second, first)
            assert " ".join(in_order) in corpus, (label, first, second)  # two consecutive sentences, as written
            if label == "swapped" and min(len(first), len(second)) > 30:
                assert f"{first} {second}" not in corpus  # swapped, save a short chance match
    share = labels.count("in_order") / len(labels)
    assert share == pytest.approx(0.5, abs=_tolerance(0.5, len(labels)))  # 1,500 pairs: +-0.052


# --- ELECTRA and GPT ------------------------------------------------------------------------------------------


def _corpus_tokens(num_tokens: int) -> list[np.ndarray]:
    """The corpus's first documents, tokenized, until `num_tokens` tokens."""
    task = seqio.get_mixture_or_task("span_corruption")
    ds = seqio.preprocessors.rekey(task.source.get_dataset("train", shuffle=False), {"targets": "text"})
    documents, total = [], 0
    for ex in seqio.preprocessors.tokenize(ds, task.output_features).as_numpy_iterator():
        documents.append(ex["targets"])
        total += len(ex["targets"])
        if total >= num_tokens:
            return documents
    return documents


def _run(objective, documents: list[np.ndarray], lengths=LENGTHS, **params) -> list[dict]:
    features = seqio.get_mixture_or_task("span_corruption").output_features
    ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant(documents)}).map(
        lambda ex: {"targets": ex["targets"]})
    with seqio.utils.map_seed_manager(5):
        return list(objective(ds, lengths, features, **params).as_numpy_iterator())


def test_electra_replaces_tokens_by_the_unigram_distribution_and_names_them(data_dir, vocab_file):
    documents = _corpus_tokens(25_000)
    original = np.concatenate(documents)
    examples = _run(objectives.electra_replaced_tokens, documents)
    inputs = np.concatenate([ex["inputs"] for ex in examples])
    assert len(inputs) == len(original)  # chunks of the documents, in order; only tokens are replaced
    replaced = inputs != original
    start = 0
    for ex in examples:  # the target lists the fake tokens as they stand in the inputs, in order
        n = len(ex["inputs"])
        assert ex["targets"].tolist() == ex["inputs"][replaced[start:start + n]].tolist()
        assert replaced[start:start + n].sum() <= max(round(0.15 * n), 1)
        start += n
    # 15% drawn; a draw equal to the original (about 1% of draws here) is no replacement.
    assert replaced.mean() == pytest.approx(0.15, abs=0.006)
    vocab = _vocab()
    cdf = objectives.unigram_cdf(vocab).numpy()
    low, high = objectives.first_random_id(vocab)
    fakes = inputs[replaced]
    assert ((fakes >= low) & (fakes < high)).all()  # ordinary pieces, never a sentinel, EOS or unk
    probs = np.diff(np.concatenate([[0.0], cdf]))
    top = np.argsort(probs)[::-1][:50] + low  # the 50 likeliest pieces carry ~30% of the mass
    expected = probs[top - low].sum()
    assert np.isin(fakes, top).mean() == pytest.approx(expected, abs=_tolerance(expected, len(fakes)) + 0.01)


def test_causal_lm_targets_are_the_text_and_inputs_empty_or_the_prefix(data_dir, vocab_file):
    documents = _corpus_tokens(3_000)
    examples = _run(objectives.causal_lm, documents)
    assert all(len(ex["inputs"]) == 0 and 0 < len(ex["targets"]) <= 127 for ex in examples)
    stream = np.concatenate([ex["targets"] for ex in examples])
    assert stream.tolist() == np.concatenate(documents).tolist()  # every token once, in order
    with gin.config_scope("lm"):
        gin.bind_parameter("lm/objectives.causal_lm.prefix", "continue:")
        prompted = _run(objectives.causal_lm, documents, {"inputs": 16, "targets": 64})
    gin.clear_config()
    assert all(ex["inputs"].tolist() == _vocab().encode("continue:") for ex in prompted)
    assert max(len(ex["targets"]) for ex in prompted) == 63  # the chunk is sized by the targets alone
    with pytest.raises(ValueError, match=r"objectives.causal_lm.prefix is \d+ tokens; TASK_FEATURE_LENGTHS inputs 2"):
        _run(objectives.causal_lm, documents[:1], {"inputs": 2, "targets": 64}, prefix="a longer prompt")


# --- ERNIE's knowledge masking -------------------------------------------------------------------------------------


def test_entity_and_phrase_units_on_a_sentence(data_dir):
    from tasks import knowledge_units

    source = knowledge_units.source_path("test", None)
    words = tf.strings.split("Peter Blackburn met the European Commission in Brussels , said the old man on "
                             "Thursday. The big red dogs ran.")
    starts, entity = (x.numpy().tolist() for x in knowledge_units.EntityUnits(source)(words))
    units = [w.decode() for w in words.numpy()]
    assert [(u, e) for u, s, e in zip(units, starts, entity, strict=True) if s and e] == [
        ("Peter", 1), ("European", 1), ("Brussels", 1)]
    assert starts[:6] == [1, 0, 1, 1, 1, 0]  # "Peter Blackburn" and "European Commission" are one unit each
    starts, phrase = (x.numpy().tolist() for x in knowledge_units.PhraseUnits(source)(words))
    phrases, current = [], []
    for word, start, inside in zip(units, starts, phrase, strict=True):
        if start and current:
            phrases.append(" ".join(current))
            current = []
        if inside:
            current.append(word)
    assert phrases + [" ".join(current)] * bool(current) == [
        "Peter Blackburn", "the European Commission", "the old man", "The big red dogs"]


def test_entity_gazetteer_and_phrase_chunker_against_conll_annotations(data_dir):
    """Measured on CoNLL-2003's development file (testa), which the units are not built from. Its sentences go in
    as one text, an empty word between two, which no entity or phrase can span."""
    from tasks import knowledge_units
    from tasks.conll import tags_to_spans
    from tasks.sources import read_conll

    source = knowledge_units.source_path("test", None)
    words: list[str] = []
    gold: dict[str, set] = {"entity": set(), "phrase": set()}
    for row in read_conll(data_dir / "conll2003" / "eng.testa", with_syntax=True):
        at = len(words)
        gold["entity"] |= {(at + a, at + b) for _, a, b in tags_to_spans(row["tags"])}
        gold["phrase"] |= {(at + a, at + b) for kind, a, b in tags_to_spans(row["chunks"]) if kind == "NP" and b > a}
        words += [*row["tokens"], ""]
    assert len(words) > 50_000
    found = {}
    for kind, finder in (("entity", knowledge_units.EntityUnits), ("phrase", knowledge_units.PhraseUnits)):
        starts, special = (x.numpy() for x in finder(source)(tf.constant(words)))
        predicted = _units(starts, special)
        hits = len(predicted & gold[kind])
        found[kind] = hits / len(predicted), hits / len(gold[kind])  # precision, recall
    # Measured: entity mentions P 0.90, R 0.68; noun phrases of 2+ words P 0.75, R 0.70.
    assert found["entity"][0] > 0.85 and found["entity"][1] > 0.6
    assert found["phrase"][0] > 0.7 and found["phrase"][1] > 0.65


def _units(starts: np.ndarray, special: np.ndarray) -> set[tuple[int, int]]:
    """(first, last) word of each special unit."""
    bounds = [*np.flatnonzero(starts), len(starts)]
    return {(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if special[a]}


@pytest.mark.parametrize("name", ["ernie_entity_masking", "ernie_phrase_masking"])
def test_ernie_masks_whole_units_first_within_the_token_budget(data_dir, vocab_file, name):
    """Lines of the corpus short enough to be one chunk each, so that every unit is whole in its chunk."""
    from tasks import knowledge_units

    task = seqio.get_mixture_or_task(name)
    vocab = task.output_features["targets"].vocabulary
    lines = []
    for row in task.source.read_rows("train"):
        if 15 <= len(row["text"].split()) <= 60 and len(vocab.encode(row["text"])) <= 120:
            lines.append(row["text"])
            if len(lines) == 400:
                break
    with seqio.utils.map_seed_manager(9):
        ds = objectives.OBJECTIVES[name](tf.data.Dataset.from_tensor_slices({"text": lines}), LENGTHS,
                                         task.output_features, mask_prob=1.0, random_prob=0.0)
        examples = list(ds.as_numpy_iterator())
    assert len(examples) == len(lines)
    # The units of every line at once: an empty word between two lines, which no unit spans.
    words = [[w.encode() for w in line.split()] for line in lines]
    finder = (knowledge_units.EntityUnits if "entity" in name else knowledge_units.PhraseUnits)(
        knowledge_units.source_path(name, None))
    starts, special = (x.numpy() for x in finder(tf.constant([w for ws in words for w in [*ws, b""]])))
    ends = np.cumsum([len(ws) + 1 for ws in words])
    mask = vocab.vocab_size - 1
    masked_total = tokens_total = special_masked = special_total = 0
    for line_words, end, ex in zip(words, ends, examples, strict=True):
        begin = end - 1 - len(line_words)
        assert ex["targets"].tolist() == vocab.encode(b" ".join(line_words).decode())  # the target is the line
        per_word = [len(vocab.encode(w.decode())) for w in line_words]
        unit_of_token = np.repeat(np.cumsum(starts[begin:end - 1]) - 1, per_word)
        special_token = np.repeat(special[begin:end - 1], per_word)
        masked = ex["inputs"] == mask
        for unit in np.unique(unit_of_token[masked]):
            assert masked[unit_of_token == unit].all(), "a unit was masked in part"
        # Special units go first: either every special token is masked, or only special tokens are.
        assert masked[special_token].all() or not masked[~special_token].any()
        masked_total, tokens_total = masked_total + masked.sum(), tokens_total + len(masked)
        special_masked += (masked & special_token).sum()
        special_total += special_token.sum()
    assert masked_total / tokens_total == pytest.approx(0.15, abs=0.015)  # the budget counts tokens
    assert special_masked / masked_total > 2 * special_total / tokens_total  # units are preferred to words


def test_a_missing_unit_source_is_one_line(data_dir, vocab_file):
    features = seqio.get_mixture_or_task("span_corruption").output_features
    ds = tf.data.Dataset.from_tensor_slices({"text": ["One line."]})
    with pytest.raises(ValueError) as error:  # gin appends "In call to configurable" lines; `mtp` drops them
        objectives.ernie_phrase_masking(ds, LENGTHS, features, source="nowhere.conll")
    assert re.fullmatch(r"objective ernie_phrase_masking: \S+/nowhere.conll \(objectives.ernie_phrase_masking.source\) "
                        r"does not exist; it needs a file in CoNLL-2003's format \(token POS chunk NER per line\)",
                        str(error.value).split("\n")[0])


def test_masking_is_drawn_again_in_every_epoch(tmp_path, vocab_file):
    """RoBERTa's dynamic masking: seqio repeats a task's data before the objective (post-cache preprocessors),
    so each epoch draws new noise for the same text; here the corpus twice, token for token, masked differently."""
    from tasks.unsupervised import register_text_tasks

    (tmp_path / "two_epochs.txt").write_text("\n".join(
        f"Paragraph {i} of a corpus read twice, with enough words to mask a few of them each time." for i in range(20)))
    names = register_text_tasks("epochs", [str(tmp_path / "two_epochs.txt")])
    try:
        ds = seqio.get_mixture_or_task("epochs_bert_mlm").get_dataset(
            LENGTHS, split="train", shuffle=False, use_cached=False, seed=2, num_epochs=2)
        examples = [{k: v[:-1] for k, v in ex.items()} for ex in ds.as_numpy_iterator()]  # EOS dropped
        inputs = np.concatenate([ex["inputs"] for ex in examples])
        targets = np.concatenate([ex["targets"] for ex in examples])
        half = len(targets) // 2
        assert targets[:half].tolist() == targets[half:].tolist()  # the same text in both epochs
        first, second = inputs[:half] != targets[:half], inputs[half:] != targets[half:]
        assert first.mean() > 0.08 and second.mean() > 0.08  # 15% chosen, 90% of them changed
        assert (first != second).mean() > 0.1  # different tokens noised: fresh masks
    finally:
        for name in names:
            seqio.TaskRegistry.remove(name)


# --- lengths ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert_mlm", "bert_mlm_wwm", "spanbert", "bart_infilling", "bart_token_deletion",
                                  "deshuffling", "prefix_lm", "causal_lm", "ernie_entity_masking",
                                  "ernie_phrase_masking"])
def test_whole_text_targets_are_never_cut(data_dir, vocab_file, name):
    """Under pretrain.gin's 512/114 lengths the chunk is sized by the targets, so the target is the whole chunk
    (before, `bert_mlm` cut its 511-token target to 114 without a word)."""
    for ex in _examples(name, 20, {"inputs": 512, "targets": 114}):
        assert len(ex["targets"]) <= 113
        if name in ("bert_mlm", "bert_mlm_wwm", "spanbert", "ernie_entity_masking", "ernie_phrase_masking"):
            assert len(ex["inputs"]) == len(ex["targets"])


def test_lengths_too_short_for_an_objective_are_named(data_dir, vocab_file):
    with pytest.raises(ValueError, match=r"objective bart_infilling: TASK_FEATURE_LENGTHS inputs 512, targets 4 "
                                         r"leave chunks under 8 tokens"):
        _examples("bart_infilling", 1, {"inputs": 512, "targets": 4})


@pytest.mark.parametrize("density", [0.15, 0.9])
def test_short_and_dense_chunks_are_noised_or_left_clean(vocab_file, density):
    """The last piece of a corpus can be a word or two; a density near 1 leaves almost no clean token."""
    features = seqio.get_mixture_or_task("span_corruption").output_features
    for objective in (objectives.spanbert, objectives.bart_infilling):
        pieces = [list(range(5, 5 + n)) for n in range(1, 12)]
        ds = tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant(pieces)}).map(
            lambda ex: {"targets": ex["targets"]})
        for ex in objective(ds, LENGTHS, features, noise_density=density).as_numpy_iterator():
            assert len(ex["inputs"]) >= 1


def test_a_corpus_task_gives_the_same_examples_whatever_was_built_before(tmp_path, vocab_file):
    """The first dataset a process builds over a corpus is the same as every later one with the same seed: a
    stage's data must not depend on what ran before it in the process (an experiment runs many stages in one)."""
    from mtplatform import data
    from tasks.unsupervised import register_text_tasks

    for part in range(3):  # files no source has checked yet in this process; several, shuffled by the seed
        (tmp_path / f"fresh_{part}.txt").write_text("\n".join(
            f"Sentence {i} of part {part} of a corpus no test has read, with more words." for i in range(50)))
    names = register_text_tasks("fresh", [str(tmp_path / "fresh_*.txt")])
    try:
        def first_batch() -> bytes:
            ds, _ = data.train_dataset(mixture_or_task_name="fresh_span_corruption", batch_size=4, seed=0,
                                       task_feature_lengths={"inputs": 64, "targets": 32})
            return next(iter(ds))["encoder_input_tokens"].numpy().tobytes()
        assert first_batch() == first_batch()
    finally:
        for name in names:
            seqio.TaskRegistry.remove(name)


def test_every_objective_is_registered_over_user_files(tmp_path, vocab_file):
    from tasks.unsupervised import register_text_tasks

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of my own corpus has words. It has two sentences." for i in range(300)))
    names = register_text_tasks("mycorpus", [str(corpus)])
    try:
        assert names == [f"mycorpus_{name}" for name in objectives.OBJECTIVES]
        for name in names:
            task = seqio.get_mixture_or_task(name)
            assert task.source.count("train") + task.source.count("validation") == 300
            ex = next(task.get_dataset({"inputs": 64, "targets": 32}, split="train", use_cached=False,
                                       shuffle=False, seed=1).as_numpy_iterator())
            assert len(ex["inputs"]) >= 1 and len(ex["targets"]) >= 2, name
            assert len(ex["inputs"]) + len(ex["targets"]) > 5, name  # prefix LM: the split point is uniform
    finally:
        for name in names:
            seqio.TaskRegistry.remove(name)
