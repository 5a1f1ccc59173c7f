"""Decoding with a key/value cache: greedy (replayed as one CUDA graph per step on a GPU, compiled by inductor on a
CPU where asked) and beam search.

`T5.generate` is the entry point; these functions read the network's layers and never change its weights. Each
step runs `DecoderBlock.forward` for one position against the cached keys and values, so decoding computes what a
full forward pass over the decoded prefix computes (tests/test_model.py checks it against transformers' generate).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mtplatform import precision, prepack
from mtplatform.model import mask_to_bias

if TYPE_CHECKING:
    from mtplatform.model import T5, Attention

Step = Callable[[Tensor, Tensor, dict], Tensor]


@torch.no_grad()
@prepack.inference()  # the weights hold still while decoding: on CPUs its steps read packed copies
def generate(model: T5, encoder_input_tokens: Tensor, max_length: int = 64, num_beams: int = 1,
             length_penalty: float = 1.0, cuda_graph: bool = True, until_eos: bool = True,
             memory: Tensor | None = None, cross: list[tuple[Tensor, Tensor]] | None = None,
             compile_steps: bool = False) -> Tensor:
    """Decode (B, ≤max_length) token ids, stopping at EOS (kept), padded with 0 after it.

    Greedy for num_beams=1; otherwise beam search scoring finished hypotheses by
    sum log-prob / length**length_penalty (length counts generated tokens, EOS included).
    On a GPU, greedy decoding replays each step as one CUDA graph (`cuda_graph`): a step of a small model is a
    few hundred short kernels, and launching them one by one from Python is what bounds its speed there.
    `until_eos=False` (greedy) decodes all `max_length` positions of every row, EOS or not: a model's cost per
    generated token, whatever it generates (`evaluate.decoding_speed`).
    `memory` (the encoder's output) and `cross` (`T5.cross_keys_values` of it), where the caller has them already:
    evaluation shares them with its teacher-forced scoring of the same inputs.
    `compile_steps`: on a CPU, steps run `compiled_step` (it pays for long decodes; see there).
    """
    if memory is None:
        memory = model.encode(encoder_input_tokens)
    compiled = compile_steps and not memory.is_cuda
    if num_beams == 1:
        return greedy(model, memory, encoder_input_tokens, max_length, cuda_graph and memory.is_cuda, until_eos,
                      cross, compiled)
    return beam_search(model, memory, encoder_input_tokens, max_length, num_beams, length_penalty, cross, compiled)


def start_cache(model: T5, memory: Tensor, encoder_tokens: Tensor, max_length: int,
                cross: list[tuple[Tensor, Tensor]] | None = None) -> dict:
    """What every step reads: per-layer cross-attention keys/values (computed once, or given), self-attention
    key/value buffers of the full length, and the self-attention bias of every (query, key) position pair with the
    causal mask folded in. Shapes never change between steps, so a step can be captured as a CUDA graph."""
    cfg, device = model.cfg, memory.device
    shape = (memory.shape[0], cfg.num_heads, max_length, cfg.d_kv)
    cross = model.cross_keys_values(memory) if cross is None else cross
    keys = [torch.zeros(shape, dtype=cross[0][0].dtype, device=device) for _ in model.decoder_layers()]
    values = [torch.zeros_like(k) for k in keys]
    enc_valid = encoder_tokens != cfg.pad_id
    positions = torch.arange(max_length, device=device)[None]
    causal = torch.ones(max_length, max_length, dtype=torch.bool, device=device).tril()[None]
    self_bias = model.decoder_bias(positions, positions) + mask_to_bias(causal)
    return {"cross": cross, "k": keys, "v": values, "cross_bias": mask_to_bias(enc_valid[:, None, :], memory.dtype),
            "self_bias": self_bias.to(memory.dtype)}


def step(model: T5, token: Tensor, t: Tensor, cache: dict) -> Tensor:
    """Logits (B, vocab) for decoder input `token` (B,) at position `t` (a one-element tensor), updating the cache.

    Each layer is `DecoderBlock.forward` for one position (no dropout: decoding runs in eval mode). The query
    attends to all cached positions; those after `t` are masked by the bias. Attending to the first t + 1
    only would change the shapes every step and rule out graph capture.
    """
    x = model.embed(token[:, None])
    self_bias = cache["self_bias"].index_select(2, t)
    for i, blk in enumerate(model.decoder_layers()):
        x = x + self_attention(blk.self_attn, blk.self_attn_norm(x), self_bias, cache["k"][i], cache["v"][i], t)
        x = x + blk.cross_attn(blk.cross_attn_norm(x), cache["cross_bias"], cache=cache["cross"][i])
        x = x + blk.ff(blk.ff_norm(x))
    return model.logits(model.decoder_norm(x))[:, 0].float()


def self_attention(attn: Attention, h: Tensor, bias: Tensor, keys: Tensor, values: Tensor, t: Tensor) -> Tensor:
    """`attn` of the normed states `h` (B, 1, d_model) of position `t`, after writing their key and value into the
    cache: `Attention.forward`, with q, k and v projected in one product (`prepack.linears`)."""
    q, k, v = (attn.split(p) for p in prepack.linears(h, (attn.q, attn.k, attn.v)))
    keys.index_copy_(2, t, k)
    values.index_copy_(2, t, v)
    return attn.attend_and_project(q, keys, values, bias)


# What a step asks of the machine: constants of its trace (no graph break at them). Marked when steps are first
# compiled, not at import: the marking loads torch._dynamo, some 1.4 s.
_PROBES = (precision.cpu_bf16_hardware, prepack.available, prepack.available_bf16)


@functools.cache  # one compiled function for the process: dynamo keeps its graphs per model and shapes
def compiled_step() -> Callable[[T5, Tensor, Tensor, dict], Tensor]:
    """`step` through `torch.compile` (inductor), dynamic in batch and input length; compiled at its first call
    for a model and maximum length.

    Why: a CPU step of a small model is some 800 operators from Python, about half its time (T5-small's layers at
    d_model 64 step in 6.7 ms against 14); inductor fuses the norms, residuals, casts and softmaxes between the
    products. The products are `prepack`'s operator, which reads the packed weights when it runs, so the graph
    holds no copy of a weight: the same compiled step decodes with the weights as they are at each call (after
    training steps, a loaded checkpoint). Attention to the cache is `model._attend_one_query`'s fused loops. On the
    AVX512-BF16 EPYC (2 cores), a greedy decode of T5-small in bf16 (64 steps, batch 8, 512 inputs, the encoder's
    pass aside) took 0.68-0.75 s against 0.92-0.98 eager, after a compile of some 15-30 s: it pays for decodes of
    thousands of steps (a generative task's validation set), not for a classification task's few tokens.
    """
    for probe in _PROBES:
        torch.compiler.assume_constant_result(probe)  # marks the function itself
    return torch.compile(step, dynamic=True)


def check_can_compile(setting: str) -> None:
    """A one-line error naming `setting` where this machine cannot compile steps: inductor's CPU code is C++, and
    without a compiler the first compiled step would fail deep inside torch."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError(f"{setting} = True: compiled steps need a C++ compiler (inductor's CPU code is C++) and "
                         "none was found: install g++ or set CXX, or leave the setting False") from None


def graphed_step(model: T5, cache: dict, batch: int) -> Step:
    """`step` captured once as a CUDA graph over static token and position buffers and this cache."""
    device = cache["self_bias"].device
    token = torch.full((batch,), model.cfg.decoder_start_id, dtype=torch.long, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    # Autocast's weight-cast cache would hand the graph tensors freed when autocast exits (PyTorch's CUDA graph
    # notes): capture with the same autocast minus its cache.
    autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast:
        step(model, token, t, cache)  # warm-up outside the graph (cuBLAS workspaces); position 0 is rewritten
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast:
        logits = step(model, token, t, cache)

    def replay(new_token: Tensor, new_t: Tensor, _cache: dict) -> Tensor:
        token.copy_(new_token)
        t.copy_(new_t)
        graph.replay()
        return logits

    return replay


def greedy(model: T5, memory: Tensor, encoder_tokens: Tensor, max_length: int, cuda_graph: bool,
           until_eos: bool = True, cross: list[tuple[Tensor, Tensor]] | None = None,
           compiled: bool = False) -> Tensor:
    """The most likely next token at every step, until every row has produced EOS (unless not `until_eos`) or
    `max_length` tokens; each step replayed as a CUDA graph (`cuda_graph`) or run by `compiled_step` (`compiled`)."""
    b, cfg = memory.shape[0], model.cfg
    cache = start_cache(model, memory, encoder_tokens, max_length, cross)
    run = compiled_step() if compiled else step
    next_logits: Step = (graphed_step(model, cache, b) if cuda_graph
                         else lambda token, t, c: run(model, token, t, c))
    token = torch.full((b,), cfg.decoder_start_id, dtype=torch.long, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    positions = torch.arange(max_length, device=memory.device)
    out = []
    for t in range(max_length):
        token = next_logits(token, positions[t : t + 1], cache).argmax(-1)
        token = token.masked_fill(done, cfg.pad_id)
        out.append(token)
        done |= token == cfg.eos_id
        if until_eos and done.all():
            break
    return torch.stack(out, 1)


def beam_search(model: T5, memory: Tensor, encoder_tokens: Tensor, max_length: int, num_beams: int,
                length_penalty: float, cross: list[tuple[Tensor, Tensor]] | None = None,
                compiled: bool = False) -> Tensor:
    """The best of `num_beams` hypotheses per row by sum log-prob / length**length_penalty; each step run by
    `compiled_step` where `compiled`."""
    b, k, eos, pad = memory.shape[0], num_beams, model.cfg.eos_id, model.cfg.pad_id
    memory = memory.repeat_interleave(k, 0)
    if cross is not None:
        cross = [(keys.repeat_interleave(k, 0), values.repeat_interleave(k, 0)) for keys, values in cross]
    cache = start_cache(model, memory, encoder_tokens.repeat_interleave(k, 0), max_length, cross)
    run = compiled_step() if compiled else step
    device = memory.device
    seqs = torch.zeros(b * k, 0, dtype=torch.long, device=device)
    scores = torch.full((b, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step has distinct candidates
    token = torch.full((b * k,), model.cfg.decoder_start_id, dtype=torch.long, device=device)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
    positions = torch.arange(max_length, device=device)
    for t in range(max_length):
        logp = F.log_softmax(run(model, token, positions[t : t + 1], cache), -1).view(b, k, -1)
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp).view(b, -1)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        beam_idx, tok_idx = top_idx // vocab, top_idx % vocab
        next_scores = torch.full((b, k), -math.inf, device=device)
        next_beam = torch.zeros(b, k, dtype=torch.long, device=device)
        next_tok = torch.full((b, k), pad, dtype=torch.long, device=device)
        for i in range(b):
            n = 0
            for s, bi, ti in zip(top_scores[i].tolist(), beam_idx[i].tolist(), tok_idx[i].tolist(), strict=True):
                if s == -math.inf:
                    break
                if ti == eos or t == max_length - 1:
                    seq = torch.cat([seqs[i * k + bi], seqs.new_tensor([ti])])
                    finished[i].append((s / (t + 1) ** length_penalty, seq))
                else:
                    next_scores[i, n], next_beam[i, n], next_tok[i, n] = s, bi, ti
                    n += 1
                if n == k:
                    break
        if all(beams_done(finished[i], next_scores[i], t + 1, k, length_penalty) for i in range(b)):
            break
        flat = (next_beam + torch.arange(b, device=device)[:, None] * k).flatten()
        seqs = torch.cat([seqs[flat], next_tok.flatten()[:, None]], 1)
        for i in range(len(cache["k"])):
            cache["k"][i] = cache["k"][i][flat]
            cache["v"][i] = cache["v"][i][flat]
        scores, token = next_scores, next_tok.flatten()
    best = [max(f, key=lambda x: x[0])[1] for f in finished]
    out = torch.full((b, max(len(s) for s in best)), pad, dtype=torch.long, device=device)
    for i, s in enumerate(best):
        out[i, : len(s)] = s
    return out


def beams_done(finished: list, running: Tensor, length: int, k: int, length_penalty: float) -> bool:
    """Done when k hypotheses are finished and the best running beam, normalised at the current length, cannot
    beat the k-th best of them: Hugging Face's rule with early_stopping=False. Exact for length_penalty = 0
    (log-probs only fall as a sequence grows); for length_penalty > 0 a longer beam could still gain from the
    larger divisor, so it is a heuristic there, as in transformers.
    """
    if len(finished) < k:
        return bool(torch.isinf(running).all())
    kth = sorted((s for s, _ in finished), reverse=True)[k - 1]
    best_running = running.max().item()
    return best_running == -math.inf or best_running / length**length_penalty <= kth
