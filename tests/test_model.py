"""The model: Hugging Face parity both ways, greedy equal to `generate`, packed equal to unpacked, decoding."""

from __future__ import annotations

import itertools
import json
import math
import re

import gin
import numpy as np
import pytest
import seqio
import torch
import torch.nn.functional as F
from transformers import T5Config as HFConfig
from transformers import T5ForConditionalGeneration

from mtplatform import checkpoints, decoding, precision, prepack, rms_norm
from mtplatform import huggingface as H
from mtplatform import model as M
from mtplatform.accounting import describe, training_flops

VERSIONS = {"t5_1_0": ("relu", True), "t5_1_1": ("gated-gelu", False)}


def _hf(version: str, vocab: int = 300, seed: int = 0) -> T5ForConditionalGeneration:
    proj, tie = VERSIONS[version]
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj=proj, tie_word_embeddings=tie, dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _inputs(vocab: int = 300, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(2, vocab, (3, 20), generator=g)
    enc[1, 14:] = 0  # padding
    dec = torch.randint(2, vocab, (3, 9), generator=g)
    dec[:, 0] = 0
    return enc, dec


def _hf_logits(hf, enc, dec):
    with torch.no_grad():
        return hf(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec).logits


@pytest.mark.parametrize("version", VERSIONS)
def test_hf_weights_give_hf_logits(version):
    hf = _hf(version)
    ours = H.from_hf_state_dict(hf.state_dict(), H.config_from_hf(hf.config.to_dict())).eval()
    enc, dec = _inputs()
    with torch.no_grad():
        got = ours(enc, dec)
    torch.testing.assert_close(got, _hf_logits(hf, enc, dec), atol=1e-4, rtol=0)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("version", VERSIONS)
def test_exported_model_loads_in_transformers(version, tmp_path):
    proj, tie = VERSIONS[version]
    torch.manual_seed(3)
    ours = M.T5(M.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                           feed_forward=proj, tie_word_embeddings=tie)).eval()
    H.export_hf(ours, tmp_path)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    enc, dec = _inputs()
    with torch.no_grad():
        want = ours(enc, dec)
    torch.testing.assert_close(_hf_logits(hf, enc, dec), want, atol=1e-4, rtol=0)
    # and back: a Hugging Face directory on disk loads into ours
    hf.save_pretrained(tmp_path / "hf")
    again = H.load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(enc, dec), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_shared_blocks_are_a_plain_t5_with_copied_layers_and_export_as_one(version, tmp_path):
    """ALBERT's cross-layer sharing: 4 encoder layers on 1 block (3 decoder layers on 1), or in 2 groups. The model
    computes what a plain T5 whose layers hold copies of the blocks computes (teacher-forced, greedy, beams), counts
    each block once, trains the block from every layer's gradient, and exports as that plain T5."""
    proj, tie = VERSIONS[version]
    base = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=3, num_heads=4,
                feed_forward=proj, tie_word_embeddings=tie)
    enc, dec = _inputs()
    for groups, encoder_blocks, decoder_blocks in ((1, [0, 0, 0, 0], [0, 0, 0]), (2, [0, 0, 1, 1], [0, 0, 1])):
        torch.manual_seed(4)
        shared = M.T5(M.T5Config(**base, shared_blocks=groups)).eval()
        assert shared.encoder_blocks == encoder_blocks and shared.decoder_blocks == decoder_blocks
        assert f"4 encoder and 3 decoder layers on {groups} shared block(s) each" in describe(shared)
        plain = M.T5(M.T5Config(**base)).eval()
        plain.load_state_dict(H.from_hf_state_dict(H.to_hf_state_dict(shared), plain.cfg).state_dict())
        block = [sum(p.numel() for p in stack[0].parameters()) for stack in (plain.encoder, plain.decoder)]
        assert shared.num_params() == plain.num_params() - (4 - groups) * block[0] - (3 - groups) * block[1]
        with torch.no_grad():
            torch.testing.assert_close(shared(enc, dec), plain(enc, dec), atol=1e-5, rtol=0)
        for beams in (1, 2):
            assert torch.equal(shared.generate(enc, max_length=6, num_beams=beams, cuda_graph=False),
                               plain.generate(enc, max_length=6, num_beams=beams, cuda_graph=False))
    shared.train()
    loss, weight = shared.loss({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                                "decoder_target_tokens": torch.roll(dec, -1, 1)})
    (loss / weight).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.encoder.parameters())
    shared.eval()
    H.export_hf(shared, tmp_path)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(hf, enc, dec), shared(enc, dec), atol=1e-4, rtol=0)


def test_a_factorized_embedding_shrinks_the_vocabulary_matrices_and_trains():
    """ALBERT's factorized embedding: vocabulary -> E -> d_model in and d_model -> E -> vocabulary out."""
    base = dict(vocab_size=2000, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4)
    torch.manual_seed(5)
    plain, factored = M.T5(M.T5Config(**base)), M.T5(M.T5Config(**base, embedding_dim=16))
    v, d, e = 2000, 128, 16
    assert plain.num_params() - factored.num_params() == (2 * v * d) - (2 * v * e + 2 * e * d)
    enc, dec = _inputs(vocab=2000)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": torch.roll(dec, -1, 1)}
    optimizer = torch.optim.AdamW(factored.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, weight = factored.loss(batch)
        (loss / weight).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss / weight).item())
    assert losses[-1] < 0.5 * losses[0]  # it learns (memorises one batch)
    factored.eval()
    assert factored.generate(enc, max_length=5, cuda_graph=False).shape[0] == 3
    with pytest.raises(ValueError, match="factorized embedding .* has no Hugging Face T5 equivalent"):
        H.to_hf_state_dict(factored)


@pytest.mark.parametrize("setting, says", [({"shared_blocks": 0}, "T5Config.shared_blocks = 0"),
                                           ({"shared_blocks": 3}, "to 2 (the layers of the shorter stack)"),
                                           ({"embedding_dim": 64}, "T5Config.embedding_dim = 64: a whole number "
                                                                   "below d_model (64)")])
def test_bad_sharing_and_factorization_settings_are_one_line(setting, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        M.T5Config(vocab_size=100, d_model=64, num_layers=2, **setting)


def test_hf_mapping_rejects_foreign_weights():
    hf = _hf("t5_1_1")
    state = dict(hf.state_dict())
    state["encoder.block.0.layer.0.SelfAttention.q.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match="q.bias"):
        H.from_hf_state_dict(state, H.config_from_hf(hf.config.to_dict()))


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_equals_transformers_generate(version):
    hf = _hf(version, seed=4)
    ours = H.from_hf_state_dict(hf.state_dict(), H.config_from_hf(hf.config.to_dict())).eval()
    enc, _ = _inputs(seed=5)
    want = hf.generate(input_ids=enc, attention_mask=(enc != 0).long(), max_new_tokens=15, do_sample=False,
                       num_beams=1)[:, 1:]  # drop the decoder start token
    got = ours.generate(enc, max_length=15)
    assert got.tolist() == want.tolist()
    with torch.no_grad():  # evaluation hands decoding the encoder's output and cross keys/values it scores with
        memory = ours.encode(enc)
        cross = ours.cross_keys_values(memory)
        teacher_forced = ours.decode(F.pad(got[:, :-1], (1, 0)), memory, enc, cross=cross)
        # Without gradients on both sides: with them, the attentions run in place (`M.attend`), whose fp32
        # rounding differs from PyTorch's kernel by about 1e-6 relative (1.3e-5 on these logits, on an AVX512 CPU).
        forward = ours(enc, F.pad(got[:, :-1], (1, 0)))
    assert torch.equal(decoding.generate(ours, enc, 15, memory=memory, cross=cross), got)
    assert torch.allclose(teacher_forced, forward, atol=1e-5)


def test_greedy_stops_at_eos_and_pads():
    hf = _hf("t5_1_1", vocab=40, seed=6)
    ours = H.from_hf_state_dict(hf.state_dict(), H.config_from_hf(hf.config.to_dict())).eval()
    with torch.no_grad():  # make EOS likely after a few tokens by boosting its output row
        ours.lm_head.weight[1] += 0.3 * ours.lm_head.weight.norm(dim=1).mean()
    enc, _ = _inputs(vocab=40, seed=7)
    out = ours.generate(enc, max_length=30)
    assert out.shape[1] <= 30
    for row in out.tolist():
        if 1 in row:
            assert all(t == 0 for t in row[row.index(1) + 1:])


def _sequence_logprob(model, enc_row, seq):
    dec = torch.tensor([[0, *seq[:-1]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(enc_row[None], dec).float(), -1)[0]
    return sum(logp[i, t].item() for i, t in enumerate(seq))


def test_beam_search_finds_the_best_sequence_exhaustively():
    # Vocabulary of 6 and 3 steps: with beams >= all prefixes, beam search is exhaustive search.
    torch.manual_seed(8)
    ours = M.T5(M.T5Config(vocab_size=6, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)).eval()
    enc = torch.tensor([[3, 4, 5, 2], [5, 5, 2, 0]])
    out = ours.generate(enc, max_length=3, num_beams=36, length_penalty=0.0)
    with torch.no_grad():
        memory = ours.encode(enc)
        given = decoding.generate(ours, enc, 3, num_beams=36, length_penalty=0.0, memory=memory,
                                  cross=ours.cross_keys_values(memory))
    assert torch.equal(given, out)
    for i in range(2):
        best_score, best = -math.inf, None
        for seq in itertools.product(range(6), repeat=3):
            seq = list(seq)
            if 1 in seq:
                seq = seq[: seq.index(1) + 1]
            score = _sequence_logprob(ours, enc[i], seq)
            if score > best_score + 1e-9:
                best_score, best = score, seq
        got = [t for t in out[i].tolist()]
        got = got[: got.index(1) + 1] if 1 in got else got[:3]
        assert _sequence_logprob(ours, enc[i], got) == pytest.approx(best_score, abs=1e-5)
        assert got == best


def test_one_beam_is_greedy():
    hf = _hf("t5_1_0", seed=9)
    ours = H.from_hf_state_dict(hf.state_dict(), H.config_from_hf(hf.config.to_dict())).eval()
    enc, _ = _inputs(seed=10)
    greedy = ours.generate(enc, max_length=10)
    beam = decoding.beam_search(ours, ours.encode(enc), enc, 10, 1, 1.0)
    for g, b in zip(greedy.tolist(), beam.tolist(), strict=True):
        g = g[: g.index(1) + 1] if 1 in g else g
        b = b[: b.index(1) + 1] if 1 in b else b
        assert g == b


def test_prepacked_linear_agrees_with_f_linear_only_where_weights_hold_still():
    """Inside `prepack.inference()` (no gradients, fp32, CPU) a large layer times a few rows reads a packed copy:
    equal to F.linear to float rounding, packed again when the weight changes in place, dropped when the scope
    closes. Anywhere else (no scope, a small layer, many rows, gradients) it is F.linear bit for bit."""
    if not prepack.available():
        pytest.skip("this torch build has no oneDNN prepacking")
    torch.manual_seed(11)
    layer, small, x = prepack.Linear(128, 4096), prepack.Linear(128, 64), torch.randn(3, 5, 128)
    many = torch.randn(prepack.FEW_ROWS + 1, 128)
    with torch.no_grad():
        plain = F.linear(x, layer.weight)
        assert torch.equal(layer(x), plain)  # no scope: F.linear itself
        with prepack.inference():
            assert torch.equal(small(x), F.linear(x, small.weight))
            assert torch.equal(layer(many), F.linear(many, layer.weight))
            assert not prepack._PACKED
            packed = layer(x)
            assert [[ref() for ref in hit[0]] for hit in prepack._PACKED.values()] == [[layer.weight]]  # oneDNN ran
            torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
            layer.weight.mul_(-2)
            torch.testing.assert_close(layer(x), -2 * plain, rtol=1e-5, atol=1e-5)
        assert not prepack._PACKED
    with prepack.inference():  # gradients: F.linear, and they flow
        out = layer(x)
        out.sum().backward()
    assert torch.equal(out.detach(), F.linear(x, layer.weight.detach()))
    assert torch.equal(layer.weight.grad, x.reshape(-1, 128).sum(0).expand(4096, 128))


def test_prepacked_linear_under_bf16_autocast_gives_autocasts_bits():
    """Under bf16 autocast inside `prepack.inference()`, every layer (small ones too) times a few rows reads a
    packed bf16 copy of its fp32 weight: the same bits as autocast's F.linear, in bf16; outside the scope, or with
    many rows, F.linear under autocast."""
    if not prepack.available_bf16():
        pytest.skip("oneDNN does not pack bf16 weights on this CPU (AVX2 only): layers stay F.linear")
    torch.manual_seed(18)
    layers, x = [prepack.Linear(128, 4096), prepack.Linear(64, 64)], [torch.randn(3, 5, 128), torch.randn(8, 64)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = [F.linear(xi, layer.weight) for layer, xi in zip(layers, x, strict=True)]
        with prepack.inference():
            got = [layer(xi) for layer, xi in zip(layers, x, strict=True)]
            assert {(hit[0][0](), hit[2].dtype) for hit in prepack._PACKED.values()} == {
                (layer.weight, torch.bfloat16) for layer in layers}
            many = torch.randn(prepack.FEW_ROWS + 1, 64)
            assert torch.equal(layers[1](many), F.linear(many, layers[1].weight))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepacked_linears_multiply_layers_of_one_input_in_one_product(precision):
    """`prepack.linears` inside `prepack.inference()`: three layers reading one input (each too small to pack alone
    in fp32, large enough together) read one packed copy of their weights stacked, and each output is its layer's
    (bf16: the same bits as autocast's F.linear; fp32: to float rounding). Outside the scope, or where one layer is
    not a `prepack.Linear` (an int8 layer, say), each layer runs itself."""
    if not (prepack.available_bf16() if precision == "bf16" else prepack.available()):
        pytest.skip(f"oneDNN does not pack {precision} weights on this CPU")
    torch.manual_seed(19)
    layers, x = tuple(prepack.Linear(128, 2048) for _ in range(3)), torch.randn(8, 1, 128)
    assert all(layer.weight.numel() < prepack.LARGE for layer in layers)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        want = [F.linear(x, layer.weight) for layer in layers]
        assert all(torch.equal(g, w) for g, w in zip(prepack.linears(x, layers), want, strict=True))
        with prepack.inference():
            got = prepack.linears(x, layers)
            assert [[ref() for ref in hit[0]] for hit in prepack._PACKED.values()] == [[w.weight for w in layers]]
            plain = (torch.nn.Linear(128, 2048, bias=False),) + layers[1:]
            prepack._PACKED.clear()
            mixed = prepack.linears(x, plain)
            assert all(len(refs) == 1 for refs, _, _ in prepack._PACKED.values())  # each layer itself
        assert torch.equal(mixed[0], F.linear(x, plain[0].weight))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (8, 1, 2048) and g.dtype == w.dtype
        if precision == "bf16":
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version,precision", [(v, "fp32") for v in VERSIONS] + [("t5_1_1", "bf16")])
def test_decoding_real_inputs_with_packed_weights_equals_plain(version, precision, vocab_file, monkeypatch):
    """Greedy and beam decoding of RTE validation inputs read packed weights on CPUs, in fp32 and under bf16
    autocast (there with a step's q, k, v and wi_0, wi_1 stacked, one product each); the tokens are the ones
    F.linear's layers decode, and the logits agree to float rounding."""
    if not (prepack.available_bf16() if precision == "bf16" else prepack.available()):
        pytest.skip(f"oneDNN does not pack {precision} weights on this CPU")
    enc = _converted(_rte_examples(6), False, {"inputs": 96, "targets": 8})["encoder_input_tokens"]
    proj, tie = VERSIONS[version]
    torch.manual_seed(12)
    model = M.T5(M.T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            feed_forward=proj, tie_word_embeddings=tie)).eval()
    reads, pack = [], prepack.packed
    monkeypatch.setattr(prepack, "packed", lambda weights, rows, dtype=torch.float32: reads.append(
        (len(weights), rows)) or pack(weights, rows, dtype))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        packed = [model.generate(enc, max_length=8), model.generate(enc, max_length=8, num_beams=3)]
    assert reads and max(rows for _, rows in reads) == 6 * 3  # each step's rows (beams x batch at most)
    if precision == "bf16":  # every layer packed; q, k, v stacked, and wi_0, wi_1 (`prepack.linears`)
        assert {stacked for stacked, _ in reads} == {1, 2, 3}
    monkeypatch.setattr(prepack, "available", lambda: False)
    with autocast:
        plain = [model.generate(enc, max_length=8), model.generate(enc, max_length=8, num_beams=3)]
    assert [t.tolist() for t in packed] == [t.tolist() for t in plain]
    dec = F.pad(packed[0][:, :-1], (1, 0))
    with torch.no_grad(), autocast:
        want = model(enc, dec)
        monkeypatch.undo()
        with prepack.inference():
            got = model(enc, dec)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # bf16: the same bits


def _decoding_model(seed: int) -> M.T5:
    torch.manual_seed(seed)
    return M.T5(M.T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).eval()


def test_compiled_decoding_step_is_one_graph(vocab_file):
    """A greedy step traces into one graph under bf16 autocast, packed products included (its products are
    `prepack`'s operator, the CPU probes constants): a graph break would run the step piecewise, slower."""
    enc = _converted(_rte_examples(3), False, {"inputs": 96, "targets": 8})["encoder_input_tokens"]
    model = _decoding_model(3)
    decoding.compiled_step()  # marks the CPU probes as constants of the trace
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), prepack.inference():
        cache = decoding.start_cache(model, model.encode(enc), enc, 8)
        token = torch.full((3,), model.cfg.decoder_start_id)
        explained = torch._dynamo.explain(decoding.step)(model, token, torch.zeros(1, dtype=torch.long), cache)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    names = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    if prepack.available_bf16():
        assert "mtplatform.packed_product" in names


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_decoding_follows_weights_changed_between_calls(precision, vocab_file):
    """`generate(compile_steps=True)` decodes RTE validation inputs as eager steps do (fp32: the same tokens, beam
    search's too; bf16: the best token at each step to bf16 rounding, the graph rounding its fused operations
    once), and after the weights change in place (a checkpoint loaded into the model) the same compiled step
    decodes with the new weights: no weight is a constant of its graph. Other batch sizes (beams) and input lengths
    reuse the graph."""
    examples = _converted(_rte_examples(6), False, {"inputs": 96, "targets": 8})["encoder_input_tokens"]
    model, other = _decoding_model(4), _decoding_model(5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    decoded, stats = [], torch._dynamo.utils.counters["stats"]
    for weights in (None, other.state_dict()):
        if weights is not None:
            model.load_state_dict(weights)
        with autocast:
            compiled = model.generate(examples, max_length=8, compile_steps=True)
            eager = model.generate(examples, max_length=8)
        if weights is None:
            graphs = stats["unique_graphs"]  # the step's graph, compiled by this first decode
        if precision == "fp32":
            assert compiled.tolist() == eager.tolist()
            beams = [model.generate(examples, max_length=8, num_beams=3, compile_steps=compile_steps)
                     for compile_steps in (True, False)]
            assert beams[0].tolist() == beams[1].tolist()
        else:  # eager bf16 steps round each operation: tokens may differ where logits are close
            _assert_greedy_within_rounding(model, examples, compiled)
        decoded.append(compiled)
    assert decoded[0].tolist() != decoded[1].tolist()  # the new weights decode differently
    with autocast:
        fewer = model.generate(examples[:4, :60], max_length=8, compile_steps=True)
        if precision == "fp32":
            assert fewer.tolist() == model.generate(examples[:4, :60], max_length=8).tolist()
    assert stats["unique_graphs"] == graphs  # neither new weights nor new shapes compiled again


@pytest.mark.slow
def test_evaluation_with_compiled_decoding_scores_as_eager(vocab_file, monkeypatch, tmp_path):
    """`evaluate_checkpoint(compile_decoding=True)` on real SQuAD validation examples (fp32) decodes through the
    compiled step and gives the metrics eager decoding gives; metrics.json says how it decoded."""
    from mtplatform import evaluate

    model = _decoding_model(6)
    directory = checkpoints.checkpoint_dir(tmp_path / "run", 1)
    directory.mkdir(parents=True)
    checkpoints.save_model(model, directory / checkpoints.MODEL)
    checkpoints.write_meta(directory, 1, 1, None, True)
    runs, compiled_step = [], decoding.compiled_step
    monkeypatch.setattr(decoding, "compiled_step", lambda: runs.append(1) or compiled_step())
    results = {}
    for compiled in (True, False):
        metrics, path = evaluate.evaluate_checkpoint(
            checkpoint_path=str(tmp_path / "run"), mixture_or_task_name="squad_v1_devsplit", num_examples=16,
            batch_size=8, max_decode_length=8, precision="fp32", output_dir=str(tmp_path / str(compiled)),
            compile_decoding=compiled)
        results[compiled] = (metrics["squad_v1_devsplit"], json.loads(path.read_text()))
        assert len(runs) == 2  # each batch's steps, compiled; none eager
    assert results[True][0] == results[False][0]
    assert results[True][1]["compile_decoding"] is True and "compile_decoding" not in results[False][1]


def _assert_greedy_within_rounding(model: M.T5, enc: torch.Tensor, tokens: torch.Tensor) -> None:
    """Each greedy token, up to its row's EOS, has a logit within bf16 rounding of the best one when a full forward
    pass scores the decoded prefix."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(enc, F.pad(tokens[:, :-1], (1, 0))).float()
    gap = logits.max(-1).values - logits.gather(-1, tokens[..., None])[..., 0]
    eos = (tokens == model.cfg.eos_id).int()
    decoded = eos.cumsum(1) - eos == 0  # positions up to and including the first EOS
    assert gap[decoded].max().item() <= 0.02 * logits.abs().max().item()


# --- packing -----------------------------------------------------------------------------------------------------


def _converted(examples, pack: bool, lengths):
    ds = seqio.EncDecFeatureConverter(pack=pack)(examples, lengths)
    rows = list(ds.as_numpy_iterator())
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def _rte_examples(n: int):
    task = seqio.get_mixture_or_task("glue_rte")
    return task.get_dataset({"inputs": 96, "targets": 8}, split="validation", shuffle=False,
                            use_cached=False).take(n)


@pytest.mark.parametrize("version", VERSIONS)
def test_packed_loss_equals_unpacked(version, vocab_file):
    import tasks  # noqa: F401

    proj, tie = VERSIONS[version]
    torch.manual_seed(11)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            feed_forward=proj, tie_word_embeddings=tie)).eval()
    examples = _rte_examples(12)
    lengths = {"inputs": 96, "targets": 8}
    packed = _converted(examples, True, {"inputs": 256, "targets": 24})
    unpacked = _converted(examples, False, lengths)
    assert packed["encoder_segment_ids"].max() > 1 and len(packed["encoder_input_tokens"]) < 12
    with torch.no_grad():
        loss_p, w_p = model.loss(packed)
        loss_u, w_u = model.loss(unpacked)
    assert w_p.item() == w_u.item() > 0
    assert abs(loss_p.item() / w_p.item() - loss_u.item() / w_u.item()) < 1e-5


def test_position_bias_on_a_cpu_has_the_embedding_lookups_values_and_gradient():
    """On a CPU the position bias reads its table with `index_select` (its backward adds rows in place, where the
    embedding's sorts the indices first): the same bias bit for bit and the same gradient (the same sums; bit for
    bit here, allowed fp32 rounding of a different order), both directions."""
    torch.manual_seed(18)
    cfg = M.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=6)
    positions = torch.arange(300)[None]
    relative = positions[:, None, :] - positions[:, :, None]
    for bidirectional in (True, False):
        bias = M.RelativePositionBias(cfg, bidirectional)
        grad = torch.randn(1, cfg.num_heads, 300, 300)
        got = bias(positions, positions)
        got.backward(grad)
        buckets = M.relative_position_bucket(relative, bidirectional, cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance)
        table = bias.embedding.weight.detach().clone().requires_grad_()
        want = F.embedding(buckets, table).permute(0, 3, 1, 2)
        want.backward(grad)
        assert torch.equal(got, want)
        torch.testing.assert_close(bias.embedding.weight.grad, table.grad, rtol=1e-5, atol=1e-4)
        assert (table.grad != 0).sum() > 20 * cfg.num_heads  # most buckets occur among 300 positions


def test_packed_bias_from_token_indices_is_exact(vocab_file, monkeypatch):
    """A packed batch's position bias is computed once from token indices (seqio's positions count up by one per
    segment); the logits of real tokens and all gradients equal those of the bias computed per row from the
    positions. Positions that do not count up by one are used as they are."""
    import tasks  # noqa: F401

    torch.manual_seed(13)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    packed = _converted(_rte_examples(8), True, {"inputs": 256, "targets": 24})
    assert packed["encoder_segment_ids"].max() > 1
    positions, segments = packed["encoder_positions"], packed["encoder_segment_ids"]
    allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)
    assert M._bias_positions(positions, allowed, 256, positions.device).shape == (1, 256)
    dec_segments = packed["decoder_segment_ids"]
    dec_pairs = (dec_segments[:, :, None] == dec_segments[:, None, :]) & (dec_segments[:, :, None] != 0)
    assert M._bias_positions(packed["decoder_positions"], dec_pairs.tril(), 24, positions.device).shape == (1, 24)

    def logits_and_grads():
        model.zero_grad()
        loss, weight = model.loss(packed)
        (loss / weight).backward()
        return model(**packed).detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = logits_and_grads()
    monkeypatch.setattr(M, "_bias_positions", lambda positions, *_: positions)
    per_row, per_row_grads = logits_and_grads()
    real = packed["decoder_segment_ids"] != 0  # a padding position's logits carry no loss and may differ
    torch.testing.assert_close(fast[real], per_row[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, per_row_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    stretched = positions * 2  # relative positions now differ from the indices': the per-row bias must be used
    assert torch.equal(M._bias_positions(stretched, allowed, 256, positions.device), stretched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_on_a_cpu_has_pytorchs_output_and_gradients(vocab_file, dtype):
    """`rms_norm` on a CPU: the output bit for bit that of `F.rms_norm` cast to the computed dtype, the gradients of
    input and weight those of `F.rms_norm`'s autograd to fp32's rounding, for fp32 and bf16 output gradients; on
    the encoder states of real RTE inputs (T5's residual stream, fp32) and a weight away from one."""
    import tasks  # noqa: F401

    torch.manual_seed(19)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    enc = _converted(_rte_examples(4), False, {"inputs": 128, "targets": 8})["encoder_input_tokens"]
    with torch.no_grad():
        states = model.encoder[0](model.embed(enc), M._attention_bias(enc[:, None, :] != 0)) * 3
    weight = torch.rand(64) + 0.5
    grad = torch.randn(*states.shape).to(dtype)

    def forward_backward(norm):
        x, w = states.clone().requires_grad_(), weight.clone().requires_grad_()
        out = norm(x, w)
        out.backward(grad)
        return out, x.grad, w.grad

    ours = forward_backward(lambda x, w: rms_norm.rms_norm(x, w, 1e-6, dtype))
    reference = forward_backward(lambda x, w: F.rms_norm(x, (64,), w, 1e-6).to(dtype))
    assert ours[0].dtype == dtype and torch.equal(ours[0], reference[0])
    for a, b in zip(ours[1:], reference[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert b.abs().max() > 1e-3


def test_training_attention_norms_and_loss_equal_pytorchs_kernels_with_gradients(vocab_file, monkeypatch):
    """In fp32 training on a CPU, every attention runs in place (`M.attend`), the norms' backward is
    `rms_norm`'s closed form and the loss goes through log_softmax: on a packed RTE batch, with dropout, the loss
    (with z-loss) and every gradient equal those of PyTorch's attention kernel, of `F.rms_norm`'s autograd and of
    the loss as logsumexp minus the target's logit."""
    import tasks  # noqa: F401

    torch.manual_seed(16)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            dropout_rate=0.1)).train()
    packed = _converted(_rte_examples(8), True, {"inputs": 256, "targets": 24})
    assert packed["encoder_segment_ids"].max() > 1
    kernel = F.scaled_dot_product_attention
    kernel_calls = []

    def counted_kernel(*args, **kwargs):
        kernel_calls.append(True)
        return kernel(*args, **kwargs)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks on both sides
        loss, weight = model.loss(packed, z_loss=1e-2)
        (loss / weight).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def reference_losses(logits, batch, z_loss=0.0):
        log_partition = torch.logsumexp(logits, dim=-1)
        token = log_partition - logits.gather(-1, batch["decoder_target_tokens"].long()[..., None]).squeeze(-1)
        return token + z_loss * log_partition.square(), batch["decoder_loss_weights"].to(logits.dtype)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_kernel)
    ours, ours_grads = loss_and_grads()
    assert not kernel_calls  # all 6 attentions (4 with the position bias, 2 cross-attentions) ran in place
    monkeypatch.setattr(M, "attend", lambda q, k, v, bias, dropout=0.0: kernel(
        q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0))
    monkeypatch.setattr(model, "losses_of", reference_losses)
    monkeypatch.setattr(rms_norm, "rms_norm", lambda x, weight, eps, dtype: F.rms_norm(
        x.float(), (x.shape[-1],), weight.float(), eps).to(dtype))
    reference, reference_grads = loss_and_grads()
    torch.testing.assert_close(ours, reference, atol=0, rtol=1e-6)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_training_attention_runs_in_place_as_close_to_fp32_as_hugging_faces(vocab_file, monkeypatch):
    """In bf16 training on a CPU, every attention runs in place (`M.attend`: the scores and the bias in one bf16
    product, the softmax computed in fp32 and rounded to bf16) instead of PyTorch's kernels (the math path upcasts
    q, k and v to fp32; the fused kernel's backward is slow). On a packed RTE batch (rows of padding: queries masked
    entirely, which must not give NaN), the loss is within bf16's rounding (2**-9) of fp32's, as Hugging Face's
    recipe under autocast (`scores += bias`, `softmax(scores.float()).type_as(scores)`) is, and the gradients are
    as close to fp32's as that recipe's."""
    import tasks  # noqa: F401

    torch.manual_seed(17)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).train()
    packed = _converted(_rte_examples(8), True, {"inputs": 256, "targets": 24})
    assert (packed["encoder_segment_ids"] == 0).any() and packed["encoder_segment_ids"].max() > 1
    kernel = F.scaled_dot_product_attention
    kernel_calls = []

    def counted_kernel(*args, **kwargs):
        kernel_calls.append(True)
        return kernel(*args, **kwargs)

    def hugging_faces_attention(q, k, v, bias, dropout=0.0):
        if not bias.requires_grad:  # the cross-attentions: PyTorch's kernel
            return kernel(q, k, v, attn_mask=bias, scale=1.0)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores += bias
        return torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(scores), v)

    def loss_and_grads(autocast=True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, weight = model.loss(packed)
        (loss / weight).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def largest_difference(grads, reference):
        return max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, reference, strict=True))

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_kernel)
    ours, ours_grads = loss_and_grads()
    assert not kernel_calls  # all 6 attentions ran in place
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in ours_grads)
    fp32, fp32_grads = loss_and_grads(autocast=False)
    monkeypatch.setattr(M, "attend", hugging_faces_attention)
    reference, reference_grads = loss_and_grads()
    # Measured: losses (sums over the batch's tokens) 211.6227 ours, 211.6087 the recipe, 211.6038 fp32; the
    # gradients' largest relative distance from fp32's 0.01513 ours, 0.01511 the recipe's.
    assert ours.item() == pytest.approx(fp32.item(), rel=2**-9)
    assert reference.item() == pytest.approx(fp32.item(), rel=2**-9)
    reference_from_fp32 = largest_difference(reference_grads, fp32_grads)
    assert largest_difference(ours_grads, fp32_grads) < 1.25 * reference_from_fp32


def test_bf16_inference_on_a_cpu_without_amx_attends_in_place_as_close_to_fp32_as_pytorchs_kernel(vocab_file,
                                                                                               monkeypatch):
    """Without gradients in bf16 on a CPU without AMX (AVX512-BF16), PyTorch's fused attention kernel is several
    times slower than `M.attend`'s batched products, so every attention (the encoder's, a decoding step's against
    the cache, the teacher-forced pass's) runs in place; with AMX the kernel stays. On a packed RTE batch (padding
    rows: queries masked entirely) and in decoding steps fed the same tokens, the logits are as close to fp32's as
    the kernel's."""
    import tasks  # noqa: F401

    torch.manual_seed(18)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).eval()
    packed = _converted(_rte_examples(8), True, {"inputs": 256, "targets": 24})
    assert (packed["encoder_segment_ids"] == 0).any()
    kernel = F.scaled_dot_product_attention
    kernel_calls = []

    def counted_kernel(*args, **kwargs):
        kernel_calls.append(True)
        return kernel(*args, **kwargs)

    tokens = model.generate(packed["encoder_input_tokens"], max_length=6)  # fp32: every side steps through these

    def logits(amx: bool, autocast: bool = True):
        monkeypatch.setattr(precision, "amx", lambda: amx)
        kernel_calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            forward = model(**packed).float()
            memory = model.encode(packed["encoder_input_tokens"])
            cache = decoding.start_cache(model, memory, packed["encoder_input_tokens"], 6)
            steps = torch.stack([decoding.step(model, tokens[:, t - 1] if t else torch.zeros_like(tokens[:, 0]),
                                               torch.tensor([t]), cache) for t in range(tokens.shape[1])], 1)
        return torch.cat([forward.flatten(), steps.float().flatten()]), len(kernel_calls)

    def distance(a, b):
        return ((a - b).norm() / b.norm()).item()

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_kernel)
    in_place, in_place_calls = logits(amx=False)
    with_kernel, kernel_count = logits(amx=True)
    fp32, _ = logits(amx=False, autocast=False)
    assert in_place_calls == 0 and kernel_count > 0
    assert torch.isfinite(in_place).all()
    # Measured (logits' relative distance from fp32's): 0.00595 in place, 0.00586 the kernel's.
    assert distance(in_place, fp32) < 1.25 * distance(with_kernel, fp32)


def test_attention_never_crosses_segments(vocab_file):
    import tasks  # noqa: F401

    torch.manual_seed(12)
    model = M.T5(M.T5Config(vocab_size=4000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)).eval()
    packed = _converted(_rte_examples(6), True, {"inputs": 256, "targets": 24})
    row = 0
    seg_e, seg_d = packed["encoder_segment_ids"][row], packed["decoder_segment_ids"][row]
    assert seg_e.max() >= 2
    changed = {k: v.clone() for k, v in packed.items()}
    # Replace every token of segment 2 in both encoder and decoder inputs.
    changed["encoder_input_tokens"][row][seg_e == 2] = 7
    changed["decoder_input_tokens"][row][(seg_d == 2) & (changed["decoder_input_tokens"][row] != 0)] = 7
    with torch.no_grad():
        a, b = model(**packed)[row], model(**changed)[row]
    others = (seg_d != 2) & (seg_d != 0)
    torch.testing.assert_close(a[others], b[others], atol=1e-6, rtol=0)
    assert (a[seg_d == 2] - b[seg_d == 2]).abs().max() > 1e-3


def test_bf16_autocast_trains_on_cpu():
    torch.manual_seed(13)
    model = M.T5(M.T5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    enc, dec = _inputs(vocab=500)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
             "decoder_target_tokens": torch.roll(dec, -1, 1), "decoder_loss_weights": torch.ones(dec.shape)}
    with torch.no_grad():
        fp32 = model.loss(batch)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, weight = model.loss(batch)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(fp32, rel=0.03)
    (loss / weight).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_z_loss_and_loss_weights():
    torch.manual_seed(14)
    model = M.T5(M.T5Config(vocab_size=500, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)).eval()
    enc, dec = _inputs(vocab=500)
    weights = torch.ones(dec.shape)
    weights[:, 5:] = 0
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec,
             "decoder_loss_weights": weights}
    with torch.no_grad():
        plain, w = model.loss(batch)
        with_z, _ = model.loss(batch, z_loss=1e-4)
        batch["decoder_target_tokens"] = dec.clone()
        batch["decoder_target_tokens"][:, 5:] = 3  # masked positions do not count
        same, _ = model.loss(batch)
    assert w.item() == 15
    assert with_z.item() > plain.item()
    assert same.item() == pytest.approx(plain.item())


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(15)
    model = M.T5(M.T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            feed_forward="relu", tie_word_embeddings=True)).eval()
    checkpoints.save_model(model, tmp_path / "m.safetensors")
    again = checkpoints.load_model(tmp_path / "m.safetensors").eval()
    enc, dec = _inputs()
    assert again.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(again(enc, dec), model(enc, dec), atol=0, rtol=0)


@pytest.mark.parametrize("name,params", [("small", 76_961_152), ("base", 247_577_856), ("tiny", None),
                                         ("t5_1_0_small", 60_506_624)])
def test_model_gin_files(name, params):
    from pathlib import Path

    gin.clear_config()
    gin.parse_config_file(str(Path(__file__).resolve().parents[1] / "gin" / "models" / f"{name}.gin"))
    try:
        cfg = M.T5Config(vocab_size=32128)
        model = M.T5(cfg)
        if params is not None:
            assert model.num_params() == params  # the published sizes of t5-v1_1-{small,base} and t5-small
        flops = training_flops(model.cfg, 512, 114)
        assert flops > 6 * model.num_params(non_embedding=True) * 114
    finally:
        gin.clear_config()
