"""Temperature scaling (lmpipe/train/calibration.py): the fit finds the NLL's minimum, and a
model's `config.temperature` divides its logits on every path (full, cached, recurrent)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.core.names import IGNORE_INDEX
from lmpipe.models.store import build_model
from lmpipe.train.calibration import fit_temperature
from lmpipe.train.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), dtype=None, threads=1)


class BigramLogits(nn.Module):
    """logits(x_t) = table[x_t]: a model whose logits are known exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, idx, targets=None):
        return self.table[idx], None


def _bigram_data(true_t: float, vocab: int = 40, n_batches: int = 12, seed: int = 0):
    """Targets drawn from softmax(table[x] / true_t): the model's logits are too sharp by
    exactly true_t; the first 5 targets of every row are masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    table = 3.0 * torch.randn(vocab, vocab, generator=g)
    batches = []
    for _ in range(n_batches):
        x = torch.randint(0, vocab, (8, 64), generator=g)
        probs = torch.softmax(table[x] / true_t, dim=-1)
        y = torch.multinomial(probs.reshape(-1, vocab), 1, generator=g).reshape(8, 64)
        y[:, :5] = IGNORE_INDEX
        batches.append((x, y))
    return BigramLogits(table), batches


def _mean_nll(model, batches, t: float) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            z = model(x)[0] / t
            total += F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += int((y != IGNORE_INDEX).sum())
    return total / n


def test_fitted_temperature_is_the_minimum_of_the_val_nll():
    model, batches = _bigram_data(true_t=1.6)
    fit = fit_temperature(model, batches, CPU)
    assert fit is not None and fit.passes <= 8
    # the losses it reports are the masked mean NLL at T = 1 and at its T
    assert fit.loss_before == pytest.approx(_mean_nll(model, batches, 1.0), rel=1e-6)
    assert fit.loss_after == pytest.approx(_mean_nll(model, batches, fit.temperature), rel=1e-6)
    # a minimum: both neighbours are worse, and a fine grid finds nothing lower
    t = fit.temperature
    assert _mean_nll(model, batches, t * 0.99) > fit.loss_after
    assert _mean_nll(model, batches, t * 1.01) > fit.loss_after
    grid = [1.0 + 0.01 * i for i in range(121)]
    assert min(_mean_nll(model, batches, g) for g in grid) >= fit.loss_after - 1e-9
    # and it recovers the temperature the targets were drawn at (~5,000 targets)
    assert t == pytest.approx(1.6, rel=0.06)
    assert fit.loss_after < fit.loss_before - 0.05


def test_a_calibrated_model_is_left_at_one_and_the_fit_restores_train_mode():
    """Targets drawn from the model's own softmax: the fitted T is ~1. Also: only masked
    targets -> no fit; the model's train/eval mode is what it was."""
    model, batches = _bigram_data(true_t=1.0, seed=1)
    model.train()
    fit = fit_temperature(model, batches, CPU)
    assert fit.temperature == pytest.approx(1.0, abs=0.05)
    assert model.training
    masked = [(x, torch.full_like(y, IGNORE_INDEX)) for x, y in batches]
    assert fit_temperature(model, masked, CPU) is None


def _tiny(kind: str, temperature: float | None):
    torch.manual_seed(0)
    if kind == "transformer":
        cfg = dict(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=32,
                   dropout=0.0, temperature=temperature)
    else:
        cfg = dict(vocab_size=32, cell="gru", d_embed=16, d_hidden=24, dropout=0.0,
                   temperature=temperature)
    return build_model(kind, cfg).eval()


@pytest.mark.parametrize("kind", ["transformer", "rnn"])
def test_config_temperature_divides_the_logits(kind):
    plain, hot = _tiny(kind, None), _tiny(kind, 1.7)
    x = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, z_t = plain(x)[0], hot(x)[0]
    torch.testing.assert_close(z_t, z / 1.7)
    assert torch.allclose(torch.softmax(z_t, -1).sum(-1), torch.ones(2, 12))


def test_temperature_applies_on_the_kv_cache_path():
    """Cached generation equals uncached with a temperature set: each cached step's logits
    are the full forward's logits at that position."""
    model = _tiny("transformer", 1.3)
    x = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)[0]
        cache = model.new_kv_cache(1)
        steps = [model(x[:, i:i + 1], kv_cache=cache)[0] for i in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_params_reject_a_temperature_that_is_not_positive():
    from pydantic import ValidationError

    from lmpipe.models.configs import TransformerConfig

    with pytest.raises(ValidationError, match="temperature"):
        TransformerConfig(temperature=0.0)
    assert TransformerConfig().temperature is None
    assert TransformerConfig(temperature=2.0).temperature == 2.0
