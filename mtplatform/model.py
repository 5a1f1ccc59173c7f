"""The T5 encoder-decoder network: packed training and losses. Decoding lives in `decoding.py` (`T5.generate` calls
it), the Hugging Face weight mapping in `huggingface.py`, the weights file in `checkpoints.py`.

The model consumes the batches of seqio's `EncDecFeatureConverter` as they are: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`, and, when packed, `*_segment_ids` and
`*_positions`. With segment ids, attention never crosses examples (encoder self-attention, decoder self-attention and
cross-attention), and relative positions come from the positions, so a packed batch computes exactly what its
examples would unpacked.

Two architectures, as in the T5 papers and Hugging Face's `T5ForConditionalGeneration`:
- T5 1.0: ReLU feed-forward, output projection tied to the input embedding, decoder output scaled by d_model**-0.5;
- T5 1.1: gated-GELU feed-forward, separate output projection, no scaling.
Both use RMSNorm without bias or mean, pre-norm residual blocks, attention without 1/sqrt(d) scaling (T5 folds it
into the initialisation), and a bucketed relative position bias computed in the first layer of each stack and
shared by the others. Attention takes the position bias and the segment/padding mask folded into one additive
mask, through `F.scaled_dot_product_attention` (in training on a CPU, and in bf16 on one without AMX, `attend`'s
batched products). Linear layers are `prepack.Linear`: nn.Linear, except that inside `prepack.inference()`
(decoding, evaluation) on a CPU they read weights reordered once for oneDNN.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mtplatform import cross_entropy, precision, prepack, rms_norm
from mtplatform.model_config import T5Config

# --- building blocks --------------------------------------------------------------------------------------------


def _computed_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype autocast computes in on `device` where it is on, else `default`."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32.

    Under autocast the output is in the autocast dtype: its consumers are linear layers, which would each cast the
    fp32 output themselves (q, k and v three times over, and three gradients cast back); cast here, once: forward
    the same bits, backward the consumers' bf16 gradients summed in bf16 before one cast (one rounding more, 1e-5
    relative in a T5-small step's gradients), 4% off a bf16 training step on an AMX CPU. On a CPU the backward pass
    is `rms_norm`'s closed form (7 passes over the activations instead of about 10)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm.rms_norm(x, self.weight, self.eps, _computed_dtype(x.device, self.weight.dtype))


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's buckets of `key_position - query_position`: exact for small distances, logarithmic up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    log_ratio = torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class RelativePositionBias(nn.Module):
    """Per-head bias from bucketed relative positions; one per stack, shared by its layers."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(B|1, Lq) and (B|1, Lk) positions -> (B|1, heads, Lq, Lk) float32 bias."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        # Made contiguous: the fused attention kernels need a mask whose key dimension is (the embedding's layout,
        # heads last, permuted, sends GPUs to the unfused path). On a GPU an embedding lookup, not indexing:
        # indexing's backward scatters into the 32 x heads entries with atomics (15% of a GPU step). On a CPU
        # `index_select`, whose backward adds rows in place (`index_add_`, the same sums): 2.5 against 13.6 ms for
        # the embedding's backward, which sorts the 512 x 512 bucket indices first.
        table = self.embedding.weight
        if table.device.type == "cpu":
            bias = table.index_select(0, buckets.flatten()).view(*buckets.shape, -1)
        else:
            bias = self.embedding(buckets)
        return bias.permute(0, 3, 1, 2).contiguous().float()


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float = 0.0) -> Tensor:
    """softmax(q k^T + bias) v, per head (T5 does not scale by 1/sqrt(d_kv)).

    In training on a CPU (gradients wanted, fp32 or bf16) PyTorch's attention kernels are slow: a bias that needs
    its gradient (the learned position bias) sends them to the unfused math path, which adds the bias out of place
    and, in bf16, upcasts q, k and v to fp32 (an AMX CPU then multiplies about 12x slower); the fused kernel's
    backward, which the cross-attentions took, is slower still (forward and backward of one at T5-small's
    8 x 114 x 512 in bf16: 27 ms against 10 ms here). Here instead: the scores and the bias in one batched product
    (`baddbmm`, the bias the accumulator's start: one pass over the scores, not a product then an add), the softmax,
    the product with v; in q's dtype (bf16: products accumulated in fp32 and rounded once with the bias added; the
    softmax computed in fp32 and rounded to bf16, PyTorch's CPU kernel). A bf16 training step of T5-small (batch 8,
    512/114) 1.64-1.67 -> 1.49-1.51 s (AMX, 2 cores); fp32 the same within noise (3.84 against 3.89 s). The mask
    must be finite (`_attention_bias`): a row masked entirely would give NaN weights.
    Without gradients in bf16 on a CPU without AMX (AVX512-BF16), too: PyTorch's fused kernel is slow there (a
    decoding step's cross-attention, 8 x 6 x 1 x 512 keys, 1.37 against 0.27 ms; an encoder's, 8 x 6 x 512 x 512,
    27 against 15 ms; greedy decoding of T5-small, batch 8, 512 inputs, 64 tokens: 3.07 against 1.80 s). On AMX
    (where greedy decoding with it ran at 2.26x Hugging Face's) and in fp32 its inference kernel stays (fp32 at
    512 x 512: 27 against 59 ms, as it never holds all the scores); on a GPU it always does. A compiled step's
    single query on a CPU: `_attend_one_query`.
    """
    if q.shape[2] == 1 and not dropout and q.device.type == "cpu" and torch.compiler.is_compiling():
        return _attend_one_query(q, k, v, bias)
    if _attend_in_place(q, bias):
        batch, heads, queries, d_kv = q.shape
        keys = k.shape[2]
        scores = torch.baddbmm(bias.to(q.dtype).expand(batch, heads, queries, keys).reshape(-1, queries, keys),
                               q.reshape(-1, queries, d_kv), k.reshape(-1, keys, d_kv).transpose(1, 2))
        weights = torch.softmax(scores.view(batch, heads, queries, keys), dim=-1)
        return torch.matmul(F.dropout(weights, dropout) if dropout else weights, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=1.0)


def _attend_one_query(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """`attend` for one query position, as products and sums that inductor fuses into loops over the keys and
    values in fp32: what a compiled decoding step (`decoding.compiled_step`) runs on a CPU.

    Why: a batched product of one query row reads the cached keys at about 11 GB/s on the AVX512-BF16 EPYC, where a
    plain pass over them runs at 42; T5-small's eight cross-attentions (8 x 6 x 512 keys) are a third of an eager
    step. A compiled greedy decode of T5-small (64 steps, batch 8, 512 inputs, bf16, the encoder's pass aside)
    took 0.68-0.78 s with this form against 0.79-0.85 s with `attend`'s batched products. Eager, the products would
    make (B, heads, keys, d_kv) temporaries: there `attend` keeps its kernels."""
    scores = (q.float() * k.float()).sum(-1)[:, :, None] + bias.float()
    weights = torch.softmax(scores, dim=-1)
    return (weights.transpose(2, 3) * v.float()).sum(2, keepdim=True).to(q.dtype)


def _attend_in_place(q: Tensor, bias: Tensor) -> bool:
    """Whether `attend` multiplies in place rather than through PyTorch's kernel (its docstring says where)."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad):
        return True
    return q.dtype == torch.bfloat16 and not precision.amx()


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q = prepack.Linear(cfg.d_model, inner)
        self.k = prepack.Linear(cfg.d_model, inner)
        self.v = prepack.Linear(cfg.d_model, inner)
        self.o = prepack.Linear(inner, cfg.d_model)
        self.heads, self.d_kv, self.dropout = cfg.num_heads, cfg.d_kv, cfg.dropout_rate

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor, kv: Tensor | None = None,
                cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attend from `x` to `kv` (default `x`) or to cached (keys, values); `bias` is the additive mask."""
        q = self.split(self.q(x))
        if cache is not None:
            k, v = cache
        else:
            src = x if kv is None else kv
            k, v = self.split(self.k(src)), self.split(self.v(src))
        return self.attend_and_project(q, k, v, bias)

    def attend_and_project(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """`attend` of head-split (B, heads, L, d_kv) queries, keys and values, heads joined and projected by `o`:
        (B, Lq, d_model). Decoding steps call it with the q, k, v they project together."""
        out = attend(q, k, v, bias, self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.feed_forward == "gated-gelu"
        if self.gated:
            self.wi_0 = prepack.Linear(cfg.d_model, cfg.d_ff)
            self.wi_1 = prepack.Linear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = prepack.Linear(cfg.d_model, cfg.d_ff)
        self.wo = prepack.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:  # wi_0 and wi_1 in one product where a few rows read packed weights (`prepack.linears`)
            gate, up = prepack.linears(x, (self.wi_0, self.wi_1))
            h = F.gelu(gate, approximate="tanh") * up
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), bias))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.self_attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg)
        self.cross_attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross_attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, self_bias: Tensor, memory: Tensor, cross_bias: Tensor,
                cross: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`cross`: this layer's cross-attention keys and values of `memory`, where already computed."""
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), self_bias))
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_bias, kv=memory, cache=cross))
        return x + self.dropout(self.ff(self.ff_norm(x)))


def _bias_positions(positions: Tensor | None, pairs: Tensor | None, length: int, device: torch.device) -> Tensor:
    """The positions to compute a stack's relative position bias from: the token indices, (1, L), wherever they give
    every (query, key) pair in `pairs` (B, L, L) (None: all pairs) the relative position that `positions` gives;
    else `positions` themselves, (B, L).

    seqio packs examples as contiguous runs whose positions count up by one, so on every pair of real tokens that
    attend (same segment) a packed batch's bias equals the unpacked one's, and it is computed once instead of per
    row: a (B, heads, L, L) gather and the scatter of its gradient saved (8% of a CPU step of a small model, about
    10 ms of a GPU step at batch 64). The check costs one (B, L, L) comparison (and, on a GPU, one wait for it).
    """
    index = torch.arange(length, device=device)[None]
    if positions is None:
        return index
    offset = index - positions  # constant within a segment exactly when its positions count up by one
    same_offset = offset[:, :, None] == offset[:, None, :]
    consistent = same_offset.all() if pairs is None else (same_offset | ~pairs).all()
    return index if bool(consistent) else positions


def _attention_bias(allowed: Tensor, position_bias: Tensor | None = None) -> Tensor:
    """The additive mask of one stack's attention: position bias (if any) plus the mask of `allowed`, cast once to
    the dtype autocast computes in, so that the layers sharing it do not each cast (and, backwards, each cast its
    gradient). The masked value is that dtype's lowest finite number (float32's would become -inf in bf16), so a
    row masked entirely (a padding query) gets uniform weights, never NaN, in every attention path."""
    dtype = _computed_dtype(allowed.device, torch.float32)
    mask = mask_to_bias(allowed, lowest=torch.finfo(dtype).min)
    return (mask if position_bias is None else position_bias + mask).to(dtype)


def mask_to_bias(allowed: Tensor, dtype: torch.dtype = torch.float32, lowest: float | None = None) -> Tensor:
    """Boolean (B, Lq, Lk) -> additive (B, 1, Lq, Lk) of `dtype`: 0 where allowed, `lowest` (default: the dtype's
    lowest finite number) elsewhere.

    Not -inf: a fully masked row (a padding query) then gets uniform weights instead of NaNs.
    """
    fill = torch.finfo(dtype).min if lowest is None else lowest
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, fill)[:, None]


# --- the model --------------------------------------------------------------------------------------------------


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        width = cfg.embedding_dim or cfg.d_model  # of the vocabulary's vectors
        self.shared = nn.Embedding(cfg.vocab_size, width)
        self.embed_proj = prepack.Linear(width, cfg.d_model) if cfg.embedding_dim else None
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True)
        self.encoder_blocks = cfg.blocks(cfg.num_layers)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(max(self.encoder_blocks) + 1))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False)
        self.decoder_blocks = cfg.blocks(cfg.num_decoder_layers)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(max(self.decoder_blocks) + 1))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.output_proj = prepack.Linear(cfg.d_model, width) if cfg.embedding_dim else None
        self.lm_head = None if cfg.tie_word_embeddings else prepack.Linear(width, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.apply(self._init_weights)

    def encoder_layers(self) -> list[EncoderBlock]:
        """The block of each encoder layer, in order (one block several times under `shared_blocks`)."""
        return [self.encoder[b] for b in self.encoder_blocks]

    def decoder_layers(self) -> list[DecoderBlock]:
        """The block of each decoder layer, in order (one block several times under `shared_blocks`)."""
        return [self.decoder[b] for b in self.decoder_blocks]

    def embed(self, tokens: Tensor) -> Tensor:
        """Token vectors in d_model (through the factorized embedding's projection where there is one)."""
        x = self.shared(tokens)
        return self.embed_proj(x) if self.embed_proj is not None else x

    def set_dropout(self, rate: float) -> None:
        """Change the dropout rate everywhere (fine-tuning adds dropout to a model pretrained without)."""
        self.cfg.dropout_rate = rate
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = rate
            elif isinstance(m, Attention):
                m.dropout = rate

    def _init_weights(self, m: nn.Module) -> None:
        """Mesh TensorFlow / t5x initialisation: unit-variance embeddings, fan-in scaling of the projections."""
        c = self.cfg
        if isinstance(m, nn.Embedding) and m is self.shared:
            nn.init.normal_(m.weight, std=1.0)
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.embedding.weight, std=c.d_model**-0.5)
        elif isinstance(m, Attention):
            nn.init.normal_(m.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
            nn.init.normal_(m.k.weight, std=c.d_model**-0.5)
            nn.init.normal_(m.v.weight, std=c.d_model**-0.5)
            nn.init.normal_(m.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
        elif isinstance(m, FeedForward):
            for w in ([m.wi_0, m.wi_1] if m.gated else [m.wi]):
                nn.init.normal_(w.weight, std=c.d_model**-0.5)
            nn.init.normal_(m.wo.weight, std=c.d_ff**-0.5)
        elif m is self.lm_head:  # t5x's fan-in scaling; HF's std 1.0 starts T5 1.1 at a loss of ~30
            nn.init.normal_(m.weight, std=(c.embedding_dim or c.d_model) ** -0.5)
        elif m is self.embed_proj and m is not None:  # unit-variance embeddings in, unit-variance states out
            nn.init.normal_(m.weight, std=c.embedding_dim**-0.5)
        elif m is self.output_proj and m is not None:
            nn.init.normal_(m.weight, std=c.d_model**-0.5)

    # -- forward --

    def encode(self, tokens: Tensor, segment_ids: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Encoder states (B, L, d_model). Without segment ids, padding (id 0) is masked out."""
        segments = segment_ids if segment_ids is not None else (tokens != self.cfg.pad_id).int()
        allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
        positions = _bias_positions(positions, allowed, tokens.shape[1], tokens.device)
        bias = _attention_bias(allowed, self.encoder_bias(positions, positions))
        x = self.dropout(self.embed(tokens))
        for block in self.encoder_layers():
            x = block(x, bias)
        return self.dropout(self.encoder_norm(x))

    def decode(self, tokens: Tensor, memory: Tensor, encoder_tokens: Tensor,
               segment_ids: Tensor | None = None, positions: Tensor | None = None,
               encoder_segment_ids: Tensor | None = None,
               cross: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Logits (B, L, vocab) for decoder inputs `tokens` attending causally and to `memory` (through its
        `cross_keys_values`, where given)."""
        length = tokens.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()[None]
        enc_segments = (encoder_segment_ids if encoder_segment_ids is not None
                        else (encoder_tokens != self.cfg.pad_id).int())
        if segment_ids is not None:
            self_allowed = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
            cross_allowed = segment_ids[:, :, None] == enc_segments[:, None, :]
            real_pairs = self_allowed & (segment_ids[:, :, None] != 0)  # padding's outputs carry no loss
        else:
            self_allowed, real_pairs = causal, None
            cross_allowed = (enc_segments[:, None, :] != 0).expand(-1, length, -1)
        positions = _bias_positions(positions, real_pairs, length, tokens.device)
        self_bias = _attention_bias(self_allowed, self.decoder_bias(positions, positions))
        cross_bias = _attention_bias(cross_allowed)
        x = self.dropout(self.embed(tokens))
        for i, block in enumerate(self.decoder_layers()):
            x = block(x, self_bias, memory, cross_bias, cross[i] if cross is not None else None)
        return self.logits(self.dropout(self.decoder_norm(x)))

    def cross_keys_values(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each decoder layer's cross-attention (keys, values) of `memory`, (B, heads, L, d_kv) each: computed once
        per input, read by every decoding step and every teacher-forced pass over the same inputs. Contiguous in
        that shape: batched products read them as they are (`attend` in place would copy a head-split view at
        every step: 0.22 of 3.1 s greedy decoding of T5-small, batch 8, 512 inputs)."""
        return [(blk.cross_attn.split(blk.cross_attn.k(memory)).contiguous(),
                 blk.cross_attn.split(blk.cross_attn.v(memory)).contiguous()) for blk in self.decoder_layers()]

    def logits(self, x: Tensor) -> Tensor:
        if self.output_proj is not None:
            x = self.output_proj(x)
        if self.lm_head is None:
            return prepack.linear(x * self.cfg.d_model**-0.5, self.shared.weight)
        return self.lm_head(x)

    def forward(self, encoder_input_tokens: Tensor, decoder_input_tokens: Tensor,
                encoder_segment_ids: Tensor | None = None, encoder_positions: Tensor | None = None,
                decoder_segment_ids: Tensor | None = None, decoder_positions: Tensor | None = None,
                **unused: Tensor) -> Tensor:
        """Logits for a batch of `EncDecFeatureConverter` features (extra features such as targets are ignored)."""
        memory = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions)
        return self.decode(decoder_input_tokens, memory, encoder_input_tokens, decoder_segment_ids,
                           decoder_positions, encoder_segment_ids)

    def token_losses(self, batch: dict[str, Tensor], z_loss: float = 0.0,
                     forward: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(loss of every target token, its weight), both (B, T) in float32; padding has weight 0.

        The token loss is cross-entropy plus `z_loss * logsumexp(logits)**2` (PaLM/t5x's z-loss) when z_loss > 0.
        `forward` is a wrapper of this model to call instead (DistributedDataParallel, torch.compile).
        """
        logits = (forward if forward is not None else self)(**batch)  # a compiled module has no bool()
        return self.losses_of(logits, batch, z_loss)

    def losses_of(self, logits: Tensor, batch: dict[str, Tensor], z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
        """`token_losses` of logits already computed, of any float dtype, for `batch` (distillation reuses them)."""
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = targets != self.cfg.pad_id
        return cross_entropy.token_cross_entropy(logits, targets, z_loss), weights.to(torch.float32)

    def loss(self, batch: dict[str, Tensor], z_loss: float = 0.0,
             forward: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(sum of weighted token losses, sum of weights): the trainer divides, after summing over micro-batches
        and processes, so that the loss is normalised per target token however the batch is split."""
        token_loss, weights = self.token_losses(batch, z_loss, forward)
        return (token_loss * weights).sum(), weights.sum()

    @torch.no_grad()
    def generate(self, encoder_input_tokens: Tensor, max_length: int = 64, num_beams: int = 1,
                 length_penalty: float = 1.0, cuda_graph: bool = True, compile_steps: bool = False) -> Tensor:
        """Decoded token ids (B, <=max_length), EOS kept and padding after it: `decoding.generate` on this model."""
        from mtplatform import decoding  # decoding reads this module's layers; imported here to keep one direction

        return decoding.generate(self, encoder_input_tokens, max_length, num_beams, length_penalty, cuda_graph,
                                 compile_steps=compile_steps)

    # -- accounting --

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a shared block counts once); `non_embedding`: without the vocabulary's matrices."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.shared.weight.numel() + (self.lm_head.weight.numel() if self.lm_head is not None else 0)
        return n
