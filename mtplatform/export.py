"""`mtp export`: one of our checkpoints as a Hugging Face T5 directory (config, safetensors, SentencePiece model)
that `T5ForConditionalGeneration.from_pretrained` and `T5Tokenizer.from_pretrained` load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mtplatform import checkpoints, huggingface, settings
from mtplatform import model as model_lib
from mtplatform.vocab import EXTRA_IDS


def export_checkpoint(checkpoint: str | Path, output: str | Path, vocab: str | Path | None = None) -> Path:
    """Write `output` from `checkpoint` (a checkpoint directory or a model directory's latest) and the
    SentencePiece model the tasks tokenized with (`vocab`, default the configured one); return `output`."""
    weights, step = checkpoints.verified_weights(checkpoint, "--checkpoint")
    model = model_lib.load(weights)
    vocab = Path(vocab) if vocab else settings.vocab_path()
    if not vocab.is_file():
        raise FileNotFoundError(f"--vocab={vocab}: no SentencePiece model there (the one the run tokenized with; "
                                f"default $MTP_VOCAB)")
    ids = _piece_count(vocab) + EXTRA_IDS
    if ids > model.cfg.vocab_size:
        raise ValueError(f"--vocab={vocab}: {ids} ids with its {EXTRA_IDS} sentinels, but the model at {weights} "
                         f"has {model.cfg.vocab_size}: not the vocabulary it was trained with")
    output = Path(output)
    huggingface.export_hf(model, output)
    shutil.copyfile(vocab, output / "spiece.model")  # T5Tokenizer's file name
    (output / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    (output / "mtp_export.json").write_text(json.dumps(
        {"checkpoint": str(weights.parent), "step": step, "vocab": str(vocab)}, indent=2) + "\n")
    return output


def _piece_count(vocab: Path) -> int:
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--vocab={vocab}: not a SentencePiece model ({e})") from e
