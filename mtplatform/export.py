"""`mtp export`: one of our checkpoints as a Hugging Face T5 directory (config, safetensors, SentencePiece model)
that `T5ForConditionalGeneration.from_pretrained` and `T5Tokenizer.from_pretrained` load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mtplatform import checkpoints, huggingface, settings
from mtplatform.model_config import T5Config
from mtplatform.settings import EXTRA_IDS


def export_checkpoint(checkpoint: str | Path, output: str | Path, vocab: str | Path | None = None,
                      overwrite: bool = False) -> Path:
    """Write `output` from `checkpoint` (a checkpoint directory or a model directory's latest) and the
    SentencePiece model the tasks tokenized with (`vocab`, default the configured one); return `output`.

    A non-empty `output` is refused unless `overwrite`. The export is written to a temporary directory beside it
    and renamed into place, so that a failure leaves the old `output` (or none), never half of a new one."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ValueError(f"--output={output} exists and is not empty; pass --overwrite to replace it")
    weights, step = checkpoints.verified_weights(checkpoint, "--checkpoint")
    state, cfg = checkpoints.load_arrays(weights)  # numpy: an export needs no torch
    vocab = Path(vocab) if vocab else settings.vocab_path()
    if not vocab.is_file():
        raise FileNotFoundError(f"--vocab={vocab}: no SentencePiece model there (the one the run tokenized with; "
                                f"default $MTP_VOCAB)")
    ids = _piece_count(vocab) + EXTRA_IDS
    if ids > cfg.vocab_size:
        raise ValueError(f"--vocab={vocab}: {ids} ids with its {EXTRA_IDS} sentinels, but the model at {weights} "
                         f"has {cfg.vocab_size}: not the vocabulary it was trained with")
    for source, what in ((weights, "the checkpoint"), (vocab, "the vocabulary")):
        if output.resolve() in source.resolve().parents:  # --overwrite would delete what it exports
            raise ValueError(f"--output={output} holds {what} being exported ({source}); write the export elsewhere")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    try:
        _write(state, cfg, vocab, tmp, {"checkpoint": str(weights.parent), "step": step, "vocab": str(vocab)})
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _write(state: dict, cfg: T5Config, vocab: Path, directory: Path, provenance: dict) -> None:
    huggingface.write_hf(state, cfg, directory)
    shutil.copyfile(vocab, directory / "spiece.model")  # T5Tokenizer's file name
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    (directory / "mtp_export.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _piece_count(vocab: Path) -> int:
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--vocab={vocab}: not a SentencePiece model ({e})") from e
