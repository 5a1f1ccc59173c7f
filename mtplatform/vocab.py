"""The SentencePiece vocabulary: T5's id layout, trained on the platform's own task text, loaded from local files.

T5's layout: pad 0, eos 1, unk 2, no bos, and 100 sentinel ids (`<extra_id_0>` is the last id) that seqio appends
to the SentencePiece model. `train_vocabulary(vocab_size=N)` therefore trains N - 100 pieces, so that the vocabulary
the model sees has exactly N ids, like T5's 32,000 + 100 = 32,100.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import seqio

from mtplatform import settings
from mtplatform.settings import EXTRA_IDS

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class ConfiguredVocabulary(seqio.SentencePieceVocabulary):
    """A `seqio.SentencePieceVocabulary` whose model file is the configured one (`settings.vocab_path()`).

    Tasks are registered at import; the path is looked up when the vocabulary is first used, so that `MTP_VOCAB` or
    a gin binding set after the import still applies. Any T5 `.model` file works as well as one we trained.
    """

    def __init__(self, extra_ids: int = EXTRA_IDS):
        super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)

    @property
    def _sentencepiece_model_file(self) -> str:  # read by seqio when it loads the model
        return str(settings.vocab_path())

    @_sentencepiece_model_file.setter
    def _sentencepiece_model_file(self, value: str) -> None:  # seqio's __init__ assigns it; the setting wins
        pass

    def _model_context(self):
        path = settings.vocab_path()
        if self._model is not None and getattr(self, "_loaded_from", None) == path:
            return self._model
        self._model = None  # the setting changed since the model was loaded (one process, several runs)
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {path}: train one with `mtp vocab train --output={path}`, "
                f"or point {settings.VOCAB_ENV} (gin: vocab_path.path) at an existing T5 .model file"
            )
        try:
            context = super()._model_context()
        except Exception as e:  # sentencepiece's parse errors name neither the file nor the cause
            raise ValueError(f"{path}: not a SentencePiece model file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from e
        self._loaded_from = path
        return context


def vocabulary_from_file(path: str | os.PathLike, extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """A vocabulary over a given local `.model` file (ours or an original T5 one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {path}")
    return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


def train_vocabulary(
    texts: Iterable[str],
    vocab_size: int,
    output: str | os.PathLike,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
) -> Path:
    """Train a unigram SentencePiece model with T5's special ids on `texts`; write `output` atomically.

    `vocab_size` counts the 100 sentinels, which seqio adds on top of the SentencePiece pieces.
    """
    import sentencepiece as spm

    if vocab_size <= EXTRA_IDS + 3:
        raise ValueError(f"--vocab_size={vocab_size} must exceed the {EXTRA_IDS} sentinels and 3 special ids")
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".vocab-") as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=_nonempty_lines(texts),
            model_prefix=prefix,
            vocab_size=vocab_size - EXTRA_IDS,
            model_type="unigram",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,  # we stream; sampling would need the whole corpus in memory twice
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(prefix + ".model", output)
        os.replace(prefix + ".vocab", output.with_suffix(".vocab"))
    return output


def _nonempty_lines(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece reads one sentence per item and rejects newlines inside one.
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line
