"""Optimizers and schedules."""

import math

import pytest
import torch

from mtplatform import optim, precision


def test_schedules():
    assert optim.learning_rate(0, 100, name="rsqrt", base=1.0, warmup_steps=10) == pytest.approx(1 / math.sqrt(10))
    assert optim.learning_rate(99, 100, name="rsqrt", base=1.0, warmup_steps=10) == pytest.approx(0.1)
    assert optim.learning_rate(4, 100, name="constant", base=0.1, warmup_steps=10) == pytest.approx(0.05)
    assert optim.learning_rate(50, 100, name="constant", base=0.1, warmup_steps=10) == pytest.approx(0.1)
    assert optim.learning_rate(99, 100, name="linear", base=0.1, warmup_steps=10) == pytest.approx(0.0)
    assert optim.learning_rate(54, 100, name="linear", base=0.1, warmup_steps=10) == pytest.approx(0.05)
    assert optim.learning_rate(54, 100, name="cosine", base=0.1, warmup_steps=10) == pytest.approx(0.05)
    assert optim.learning_rate(99, 100, name="cosine", base=0.1, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="learning_rate.name='nope'"):
        optim.learning_rate(0, 10, name="nope")


@pytest.mark.parametrize("name", ["adafactor", "adamw", "adamw_scale"])
def test_optimizers_reduce_a_loss(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16))
    target = torch.randn(16, 16)
    opt = optim.make_optimizer([w], name=name)
    first = None
    for _ in range(50):
        for g in opt.param_groups:
            g["lr"] = 0.01
        loss = (w - target).pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.7 * first
    with pytest.raises(ValueError, match="make_optimizer.name='sgdx'"):
        optim.make_optimizer([w], name="sgdx")


def test_adamw_scale_step_is_parameter_rms_scaled():
    big = torch.nn.Parameter(torch.full((4, 4), 10.0))
    small = torch.nn.Parameter(torch.full((4, 4), 0.1))
    opt = optim.AdamWScale([big, small], lr=0.01, weight_decay=0.0)
    (big.sum() + small.sum()).backward()
    opt.step()
    # Adam's first step moves each weight by lr; scaled by RMS(p): 10x and 0.1x of that.
    assert (10.0 - big.detach()).mean().item() == pytest.approx(0.1, rel=1e-3)
    assert (0.1 - small.detach()).mean().item() == pytest.approx(0.001, rel=1e-3)


def test_precision_auto(monkeypatch):
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)
    detected = precision.native_bf16()
    assert precision.resolve("auto") == ("bf16" if detected else "fp32")
    with pytest.raises(ValueError, match="precision='fp16'"):
        precision.resolve("fp16")
    # MTP_NATIVE_BF16 makes any machine answer as the other kind would.
    for value, native in (("native", True), ("not-native", False), ("1", True), ("0", False)):
        monkeypatch.setenv(precision.NATIVE_BF16_ENV, value)
        assert precision.native_bf16() is native
        assert precision.resolve("auto") == ("bf16" if native else "fp32")
        assert precision.resolve("fp32") == "fp32"  # an explicit precision is never overridden
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "sometimes")
    with pytest.raises(ValueError, match="MTP_NATIVE_BF16='sometimes'"):
        precision.native_bf16()
