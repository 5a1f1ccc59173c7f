"""`cross_entropy.token_cross_entropy`: the loss and gradient of log_softmax's cross-entropy (and the z-loss) in any
logits dtype, a few rows at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtplatform import cross_entropy


def _reference(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    log_partition = torch.logsumexp(logits.float(), dim=-1)
    target_logit = logits.float().gather(-1, targets[..., None]).squeeze(-1)
    return log_partition - target_logit + z_loss * log_partition.square()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_loss_and_gradient_equal_log_softmax_over_uneven_chunks(dtype, z_loss, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 7 * 3001)  # 7 rows a chunk: 37 rows end in a short one
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 3001, generator=g) * 4).to(dtype).view(1, 37, 3001).requires_grad_()
    targets = torch.randint(0, 3001, (1, 37), generator=g)
    weights = torch.rand(1, 37, generator=g)
    before = logits.detach().clone()
    ours = cross_entropy.token_cross_entropy(logits, targets, z_loss)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    assert torch.equal(logits.detach(), before)  # the backward pass leaves the saved logits as they were
    want = _reference(logits, targets, z_loss)
    (want * weights).sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-5)
    assert ours_grad.dtype == dtype
    # The reference's gradient is rounded to bf16 once more on its way back through the cast.
    torch.testing.assert_close(ours_grad.float(), logits.grad.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-7 if dtype == torch.float32 else 1e-4)


def test_log_softmax_of_bf16_logits_is_what_it_avoids():
    """Why not `F.cross_entropy` on bf16 logits: it rounds the log-probabilities to bf16, an error of the order of
    1e-2 on a loss of about 10, where ours is fp32's."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 32128, generator=g) * 3).bfloat16()
    targets = torch.randint(0, 32128, (64,), generator=g)
    exact = _reference(logits, targets, 0.0)
    rounded = F.cross_entropy(logits, targets, reduction="none").float()
    ours = cross_entropy.token_cross_entropy(logits, targets)
    assert (rounded - exact).abs().max() > 1e-3
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-5)
