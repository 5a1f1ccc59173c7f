"""The T5 network's shape (gin's `T5Config`): a plain dataclass, read without torch by what only needs the shape
(`mtp export` maps a checkpoint's weights by name, `accounting` counts FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

import gin


@gin.configurable
@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    feed_forward: str = "gated-gelu"  # "gated-gelu" (T5 1.1) or "relu" (T5 1.0)
    tie_word_embeddings: bool = False  # True for T5 1.0: tied output projection, scaled decoder output
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    # ALBERT's cross-layer sharing: None, a block per layer (T5); k, each stack's layers in k consecutive groups
    # that share one block's weights (1: every encoder layer shares one block, every decoder layer another).
    shared_blocks: int | None = None
    # ALBERT's factorized embedding: None, tokens embed straight into d_model (T5); E, vocabulary -> E -> d_model in,
    # d_model -> E -> vocabulary out (tied to the input embedding where tie_word_embeddings).
    embedding_dim: int | None = None

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.feed_forward not in ("gated-gelu", "relu"):
            raise ValueError(
                f"T5Config.feed_forward={self.feed_forward!r}: use 'gated-gelu' (T5 1.1) or 'relu' (T5 1.0)")
        fewest = min(self.num_layers, self.num_decoder_layers)
        if self.shared_blocks is not None and (isinstance(self.shared_blocks, bool) or not isinstance(
                self.shared_blocks, int) or not 1 <= self.shared_blocks <= fewest):
            raise ValueError(f"T5Config.shared_blocks = {self.shared_blocks!r}: a whole number of blocks per stack "
                             f"from 1 (ALBERT) to {fewest} (the layers of the shorter stack), or None (no sharing)")
        if self.embedding_dim is not None and (isinstance(self.embedding_dim, bool) or not isinstance(
                self.embedding_dim, int) or not 1 <= self.embedding_dim < self.d_model):
            raise ValueError(f"T5Config.embedding_dim = {self.embedding_dim!r}: a whole number below d_model "
                             f"({self.d_model}), as ALBERT's 128, or None (no factorized embedding)")

    def blocks(self, layers: int) -> list[int]:
        """The block each of a stack's `layers` layers runs: its own, or its group's under `shared_blocks`."""
        groups = self.shared_blocks or layers
        return [i * groups // layers for i in range(layers)]
