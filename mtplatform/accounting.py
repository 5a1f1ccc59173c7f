"""What a model costs: its parameters as `mtp train` describes them, and the FLOPs of a training step (for MFU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtplatform.model_config import T5Config

if TYPE_CHECKING:
    from mtplatform.model import T5


def describe(model: T5) -> str:
    """Its parameter count, with the sharing and factorization that make it smaller than a plain T5's."""
    c = model.cfg
    parts = [f"{model.num_params():,} parameters"]
    if c.shared_blocks is not None:
        parts.append(f"{c.num_layers} encoder and {c.num_decoder_layers} decoder layers on {c.shared_blocks} "
                     "shared block(s) each")
    if c.embedding_dim:
        parts.append(f"factorized embedding {c.vocab_size:,} -> {c.embedding_dim} -> {c.d_model}")
    return ", ".join(parts)


def training_flops(cfg: T5Config, inputs_length: int, targets_length: int) -> float:
    """Approximate FLOPs of one training step (forward + backward) for one example of these lengths.

    6 FLOPs per parameter per token for the matrix products (encoder weights see the input tokens, decoder
    weights and the output projection see the target tokens) plus the attention score and mixing products
    (6 * 2 * heads * d_kv per query-key pair), in the style of nanoGPT's MFU estimate.
    """
    inner = cfg.num_heads * cfg.d_kv
    ff = (3 if cfg.feed_forward == "gated-gelu" else 2) * cfg.d_model * cfg.d_ff
    enc_layer = 4 * cfg.d_model * inner + ff
    dec_layer = 8 * cfg.d_model * inner + ff
    width = cfg.embedding_dim
    output = cfg.d_model * cfg.vocab_size if not width else width * (cfg.d_model + cfg.vocab_size)
    matmul = 6 * (cfg.num_layers * enc_layer * inputs_length
                  + cfg.num_decoder_layers * dec_layer * targets_length
                  + output * targets_length)
    attention = 6 * 2 * inner * (cfg.num_layers * inputs_length**2
                                 + cfg.num_decoder_layers * (targets_length**2 + targets_length * inputs_length))
    return float(matmul + attention)
