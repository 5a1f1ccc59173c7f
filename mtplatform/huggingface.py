"""Hugging Face `T5ForConditionalGeneration` weights both ways: how a user fine-tunes a real pretrained T5 they have
on disk (`load_hf`), and how a trained model leaves for transformers (`export_hf`). Names map one to one; a tied
output projection is written out as transformers expects.

Exporting needs no torch: the weights are renamed as arrays and written through safetensors' numpy API, so that
`mtp export` reads a checkpoint and writes the directory without importing torch (`checkpoints.load_arrays`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtplatform.model_config import T5Config

if TYPE_CHECKING:
    from torch import Tensor

    from mtplatform.model import T5

# (Hugging Face name, our name); {i} is a layer index, {p} a projection. First match wins, so the relative bias,
# which lives in layer 0 of each HF stack, comes before the generic attention names.
_NAMES = [
    ("shared.weight", "shared.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder_bias.embedding.weight"),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder_bias.embedding.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.{p}.weight", "encoder.{i}.attn.{p}.weight"),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.{i}.attn_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.{p}.weight", "encoder.{i}.ff.{p}.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.{i}.ff_norm.weight"),
    ("encoder.final_layer_norm.weight", "encoder_norm.weight"),
    ("decoder.block.{i}.layer.0.SelfAttention.{p}.weight", "decoder.{i}.self_attn.{p}.weight"),
    ("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.{i}.self_attn_norm.weight"),
    ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight", "decoder.{i}.cross_attn.{p}.weight"),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.{i}.cross_attn_norm.weight"),
    ("decoder.block.{i}.layer.2.DenseReluDense.{p}.weight", "decoder.{i}.ff.{p}.weight"),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.{i}.ff_norm.weight"),
    ("decoder.final_layer_norm.weight", "decoder_norm.weight"),
]


def _rename(name: str, to_ours: bool) -> str | None:
    for hf, ours in _NAMES:
        src, dst = (hf, ours) if to_ours else (ours, hf)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
        match = re.fullmatch(pattern, name)
        if match:
            return dst.format(**match.groupdict())
    return None


_HF_ALIASES = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # the shared embedding again


def config_from_hf(hf: dict) -> T5Config:
    """Our config from a Hugging Face T5 `config.json` dict."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ValueError(f"feed_forward_proj={proj!r} is not supported (relu for T5 1.0, gated-gelu for T5 1.1)")
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        num_layers=hf["num_layers"], num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"], relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.1), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward=proj, tie_word_embeddings=hf.get("tie_word_embeddings", True),
        pad_id=hf.get("pad_token_id", 0), eos_id=hf.get("eos_token_id", 1),
        decoder_start_id=hf.get("decoder_start_token_id", 0),
    )


def config_to_hf(cfg: T5Config) -> dict:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward, "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
    }


def from_hf_state_dict(state: dict[str, Tensor], cfg: T5Config) -> T5:
    """Our model holding the weights of a `T5ForConditionalGeneration` state dict."""
    from mtplatform.model import T5

    model = T5(cfg)
    ours = {}
    for name, tensor in state.items():
        if name in _HF_ALIASES or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target = _rename(name, to_ours=True)
        if target is None:
            raise ValueError(f"Hugging Face parameter {name!r} has no counterpart in mtplatform's T5")
        ours[target] = tensor
    missing = set(model.state_dict()) - set(ours)
    if missing:
        raise ValueError(f"the Hugging Face weights lack {sorted(missing)}")
    model.load_state_dict(ours)
    return model


def hf_weights(state: Mapping[str, Any], cfg: T5Config) -> dict[str, Any]:
    """Our weights (arrays or tensors, by our names) under `T5ForConditionalGeneration`'s names, lm_head included
    even when tied (the same object as `shared.weight` then). A model with shared blocks (`T5Config.shared_blocks`)
    is expanded: each layer gets its block's weights, a plain T5 that computes the same function. A factorized
    embedding has no T5 equivalent and is refused."""
    if cfg.embedding_dim:
        raise ValueError(f"a factorized embedding (T5Config.embedding_dim = {cfg.embedding_dim}) has no "
                         "Hugging Face T5 equivalent: T5ForConditionalGeneration embeds straight into d_model")
    blocks = {"encoder": cfg.blocks(cfg.num_layers), "decoder": cfg.blocks(cfg.num_decoder_layers)}
    out = {_rename(per_layer, to_ours=False): value
           for name, value in state.items() for per_layer in _per_layer(name, blocks)}
    out.setdefault("lm_head.weight", out["shared.weight"])
    return out


def to_hf_state_dict(model: T5) -> dict[str, Tensor]:
    """`hf_weights` of a model in memory, each tensor its own copy (what `load_state_dict` of transformers' T5
    takes)."""
    return {name: tensor.detach().clone().contiguous()
            for name, tensor in hf_weights(model.state_dict(), model.cfg).items()}


def _per_layer(name: str, blocks: dict[str, list[int]]) -> list[str]:
    """Our parameter `name` once for each layer that runs it: `encoder.<block>.<rest>` -> `encoder.<layer>.<rest>`
    for every layer on that block (without sharing, layer i is block i); names outside the stacks as they are."""
    stack, _, rest = name.partition(".")
    if stack not in blocks:
        return [name]
    block, _, param = rest.partition(".")
    return [f"{stack}.{layer}.{param}" for layer, on in enumerate(blocks[stack]) if on == int(block)]


def is_hf_directory(path: str | Path) -> bool:
    """Whether `path` is in Hugging Face's layout (a `config.json`; our checkpoints have meta.json and config.gin)."""
    return (Path(path) / "config.json").is_file()


def load_hf(directory: str | Path) -> T5:
    """Our model from a local Hugging Face T5 directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`): how a user fine-tunes a real pretrained T5 they have on disk."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: a Hugging Face T5 directory needs its config.json")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")
    return from_hf_state_dict(state, cfg)


def write_hf(state: Mapping[str, np.ndarray], cfg: T5Config, directory: str | Path) -> None:
    """Write a directory that `T5ForConditionalGeneration.from_pretrained` loads, from our weights as arrays."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    weights = {name: np.ascontiguousarray(array) for name, array in hf_weights(state, cfg).items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


def export_hf(model: T5, directory: str | Path) -> None:
    """`write_hf` of a model in memory."""
    write_hf({name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}, model.cfg,
             directory)
