"""Correctness of the neural models: RoPE, causality, KV cache, masked loss, save/load, overfit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmpipe.core.errors import InputError
from lmpipe.models.rnn import RNNLM, ElmanLayer
from lmpipe.models.store import build_model, count_parameters, load_model, save_model
from lmpipe.models.transformer import (
    RMSNorm,
    RMSNormFunction,
    Transformer,
    apply_rotary,
    causal_attention,
    dropout,
    rope_cos_sin,
)

# tiny tensors gain nothing from threads (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


V = 37
TCFG = dict(vocab_size=V, context_length=32, n_layer=2, n_head=4, d_model=32, dropout=0.0)


def tiny_transformer(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return build_model("transformer", {**TCFG, **over}).eval()


def tiny_rnn(cell: str = "rnn", seed: int = 0, **over) -> RNNLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, cell=cell, n_layer=2, d_embed=16, d_hidden=24, dropout=0.0)
    return build_model("rnn", {**cfg, **over}).eval()


ALL_MODELS = [
    pytest.param(lambda: tiny_transformer(), id="transformer"),
    pytest.param(lambda: tiny_transformer(activation="gelu", tie_embeddings=False, bias=True,
                                          qk_norm=False),
                 id="transformer-gelu-untied-no-qk-norm"),
    pytest.param(lambda: tiny_rnn("rnn"), id="rnn"),
    pytest.param(lambda: tiny_rnn("lstm"), id="lstm"),
    pytest.param(lambda: tiny_rnn("gru"), id="gru"),
]


# ----------------------------------------------------------------------------- RoPE
def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = 16
    cos, sin = rope_cos_sin(d, 64)
    q, k = torch.randn(d), torch.randn(d)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q[None], cos[m:m + 1], sin[m:m + 1])[0]
        kn = apply_rotary(k[None], cos[n:n + 1], sin[n:n + 1])[0]
        return float(qm @ kn)

    for m, n in [(5, 2), (10, 10), (3, 9)]:
        base = score(m, n)
        for shift in (1, 7, 40):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    # ... and the offset does matter (RoPE is not a no-op)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3
    # rotation preserves the norm
    x = torch.randn(8, d)
    assert torch.allclose(apply_rotary(x, cos[:8], sin[:8]).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rotary_turns_each_pair_by_its_own_angle():
    d, theta, t = 8, 10000.0, 5
    cos, sin = rope_cos_sin(d, t + 1, theta)
    x = torch.randn(d, dtype=torch.float64)
    got = apply_rotary(x.float()[None], cos[t:t + 1], sin[t:t + 1])[0].double()
    for i in range(d // 2):   # pair i = (x[i], x[i + d/2]) as a complex number, times e^{i angle}
        angle = t * theta ** (-2 * i / d)
        z = complex(x[i], x[i + d // 2]) * complex(math.cos(angle), math.sin(angle))
        assert got[i].item() == pytest.approx(z.real, abs=1e-5)
        assert got[i + d // 2].item() == pytest.approx(z.imag, abs=1e-5)


def test_rope_at_position_zero_is_identity():
    cos, sin = rope_cos_sin(8, 4)
    assert cos.shape == sin.shape == (4, 8)
    x = torch.randn(1, 8)
    assert torch.equal(apply_rotary(x, cos[:1], sin[:1]), x)


def test_rmsnorm_is_the_written_formula():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0).double()
    assert torch.allclose(norm(x.float()).double(), want, atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_training_form_matches_f_rms_norm_in_value_and_gradient(dtype):
    """On a CPU with autograd on, RMSNorm runs its written-out backward (`RMSNormFunction`);
    its output and both gradients equal those of `F.rms_norm` (the form used without
    autograd), for an fp32 residual stream and a bf16 query/key as under autocast."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 16) * 3).to(dtype)
    w = torch.randn(16)
    dy = torch.randn(2, 5, 16).to(dtype)
    grads = []
    for form in ("written", "F"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if form == "written":
            y = RMSNormFunction.apply(xi, wi, 1e-5)
        else:
            y = F.rms_norm(xi.float(), (16,), wi, 1e-5).to(dtype)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, wi.grad))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for got, want in zip(grads[0], grads[1]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    norm = RMSNorm(16)   # the module: the written-out form with autograd on, F.rms_norm without
    with torch.no_grad():
        norm.weight.copy_(w)
    assert type(norm(x).grad_fn).__name__ == "RMSNormFunctionBackward"
    with torch.no_grad():
        torch.testing.assert_close(norm(x), grads[0][0], **tol)


def test_rmsnorm_written_out_gradient_passes_gradcheck():
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, w))


# ----------------------------------------------------------------------------- QK-norm
def test_qk_norm_makes_scores_independent_of_the_size_of_w_q_and_w_k():
    """With QK-norm a head's scores depend on the directions of q and k only: scaling the q and
    k rows of `qkv` leaves the logits unchanged. Without it the same scaling sharpens them."""
    idx = torch.randint(0, V, (2, 16))
    for qk_norm in (True, False):
        model = tiny_transformer(qk_norm=qk_norm)
        before, _ = model(idx)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[:2 * TCFG["d_model"]] *= 10.0   # the W_q and W_k rows
        after, _ = model(idx)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        else:
            assert (after - before).abs().max() > 1e-2


def test_qk_norm_is_rmsnorm_of_each_heads_query_and_key():
    """The attention input is RMSNorm(q), RMSNorm(k) per head (one gain vector), then RoPE."""
    model = tiny_transformer()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qk_norm.weight.copy_(torch.linspace(0.5, 2.0, attn.head_dim))
    x = torch.randn(2, 8, TCFG["d_model"])
    seen = {}

    def spy(q, k, v):
        seen["q"], seen["k"] = q, k
        return causal_attention(q, k, v)

    import lmpipe.models.transformer as tm
    original, tm.causal_attention = tm.causal_attention, spy
    try:
        attn(x, model.rope_cos[:8], model.rope_sin[:8])
    finally:
        tm.causal_attention = original
    q, k, _ = attn.qkv(x).view(2, 8, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
    g = attn.qk_norm.weight
    for got, raw in ((seen["q"], q), (seen["k"], k)):
        normed = raw / torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-5) * g
        want = apply_rotary(normed, model.rope_cos[:8], model.rope_sin[:8])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_saved_before_qk_norm_loads_without_it(tmp_path):
    """config.json written before `qk_norm` existed has no such key, and no qk_norm weights:
    it loads as the model it was (no QK-norm), with the same logits."""
    old = tiny_transformer(qk_norm=False)
    save_model(old, tmp_path / "m", "transformer", old.config)
    path = tmp_path / "m" / "config.json"
    info = json.loads(path.read_text())
    del info["config"]["qk_norm"]
    path.write_text(json.dumps(info))
    loaded, _ = load_model(tmp_path / "m")
    idx = torch.randint(0, V, (2, 12))
    assert loaded.blocks[0].attn.qk_norm is None
    assert torch.equal(loaded(idx)[0], old(idx)[0])


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("make", ALL_MODELS)
def test_changing_a_future_token_never_changes_past_logits(make):
    model = make()
    torch.manual_seed(1)
    idx = torch.randint(0, V, (2, 20))
    logits, _ = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % V
        new, _ = model(changed)
        assert torch.equal(new[:, :t], logits[:, :t]), f"position < {t} changed"
        assert not torch.allclose(new[:, t], logits[:, t]), "the changed token had no effect"


# ----------------------------------------------------------------------------- attention
def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + M) v in float64, the last T of S positions as queries."""
    q, k, v = q.double(), k.double(), v.double()
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.arange(S)[None, :] > torch.arange(T)[:, None] + (S - T)
    return torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v


@pytest.mark.parametrize("T,S", [(12, 12), (1, 12), (5, 12)])   # square, decode step, chunk
@pytest.mark.parametrize("dtype,grad,atol", [
    (torch.float32, False, 1e-5),       # inference: F.scaled_dot_product_attention
    (torch.float32, True, 1e-5),        # fp32 training: the same fused kernel
    (torch.bfloat16, True, 3e-2),       # CPU bf16 training: the maths written out
    (torch.bfloat16, False, 3e-2),      # CPU bf16 scoring: the same
])
def test_causal_attention_is_softmax_of_masked_scores_times_values(T, S, dtype, grad, atol):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8) for n in (T, S, S))
    want = reference_attention(q, k, v)
    qd, kd, vd = (t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v))
    got = causal_attention(qd, kd, vd)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol)
    if grad:   # the gradients of the two kernels agree too
        w = torch.randn(want.shape, dtype=torch.float64)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        (reference_attention(q64, k64, v64) * w).sum().backward()
        (got.double() * w).sum().backward()
        for mine, ref in ((qd, q64), (kd, k64), (vd, v64)):
            torch.testing.assert_close(mine.grad.double(), ref.grad, atol=3 * atol, rtol=3 * atol)


@pytest.mark.parametrize("p,k", [(0.1, 26), (0.5, 128), (1e-4, 1)])
def test_dropout_drops_p_to_the_nearest_256th_and_keeps_the_mean(p, k):
    """dropout(): rate k/256 with k = round(256 p) (at least 1), survivors scaled by
    256/(256 - k) so the mean is kept; reproducible under the seed; the gradient is the mask."""
    x = torch.ones(1_000_000)
    torch.manual_seed(0)
    y = dropout(x, p)
    assert y.unique().tolist() == pytest.approx([0.0, 256 / (256 - k)])
    rate, sd = k / 256, math.sqrt(k / 256 * (1 - k / 256) / x.numel())
    assert abs((y == 0).float().mean().item() - rate) < 5 * sd
    assert abs(y.double().mean().item() - 1.0) < 5 * sd * 256 / (256 - k)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p), y)
    assert dropout(x, 0.0) is x
    w = torch.randn(3, 1001, requires_grad=True)   # odd size: the random bytes are cut to fit
    out = dropout(w, p)
    out.sum().backward()
    assert torch.equal(w.grad, (out != 0).float() * (256 / (256 - k)))


def test_dropout_is_active_in_training_only():
    model = tiny_transformer(dropout=0.2)
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model(idx)[0], model(idx)[0])          # eval: deterministic
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])      # train: masks differ per call


def test_bf16_training_step_of_the_model_matches_fp32_in_loss_and_gradients():
    """The written-out bf16 attention inside the model: loss and gradients near fp32's."""
    model = tiny_transformer(dropout=0.0).train()
    idx = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(4))
    _, loss32 = model(idx, idx)
    g32 = torch.autograd.grad(loss32, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx, idx)
    g16 = torch.autograd.grad(loss16, list(model.parameters()))
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    cos = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) for a, b in zip(g16, g32)]
    assert min(c.item() for c in cos) > 0.99


# ----------------------------------------------------------------------------- KV cache
def test_kv_cache_logits_match_full_forward_in_chunks():
    model = tiny_transformer()
    torch.manual_seed(2)
    idx = torch.randint(0, V, (3, 30))
    full, _ = model(idx)
    cache = model.new_kv_cache(3, 30)
    parts = []
    for a, b in [(0, 9), (9, 10), (10, 17), (17, 18), (18, 30)]:   # prefill, steps, chunks
        parts.append(model(idx[:, a:b], kv_cache=cache)[0])
    assert cache.length == 30
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_in_fp32_serves_bf16_steps_under_autocast():
    """A bf16 step writes its keys/values into the fp32 cache and reads them back as bf16:
    the cached logits stay within bf16 rounding of the full bf16 forward, and the cache
    holds what the full forward's keys are (no position left unwritten)."""
    model = tiny_transformer()
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(idx)
        cache = model.new_kv_cache(2, 24)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 10), (10, 11), (11, 24)]]
    assert cache.k.dtype == torch.float32 and cache.length == 24
    assert cache.k[:, :, :, :24].abs().sum(-1).min() > 0
    cached = torch.cat(parts, 1).float()
    assert (cached - full.float()).abs().max() < 0.1 * full.float().abs().max()
    assert (cached.argmax(-1) == full.float().argmax(-1)).float().mean() > 0.95


def test_kv_cache_refuses_overflow_and_oversize():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="max_len"):
        model.new_kv_cache(1, TCFG["context_length"] + 1)
    cache = model.new_kv_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="context_length"):
        tiny_transformer()(torch.zeros(1, TCFG["context_length"] + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("make", ALL_MODELS)
def test_masked_loss_equals_hand_computation(make):
    model = make()
    torch.manual_seed(3)
    idx = torch.randint(0, V, (2, 6))
    targets = torch.randint(0, V, (2, 6))
    targets[0, :4] = -100
    targets[1, 5] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(6) if targets[b, t] != -100]
    assert len(terms) == 7
    assert loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)
    # fully masked batch: zero loss (not NaN) and zero gradients
    _, empty = model(idx, torch.full_like(targets, -100))
    empty.backward()
    assert empty.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_initial_loss_is_near_uniform():
    model = tiny_transformer()
    idx, targets = torch.randint(0, V, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(V)) < 0.2


# ----------------------------------------------------------------------------- Elman maths
def test_visible_elman_layer_equals_torch_rnn():
    torch.manual_seed(4)
    layer = ElmanLayer(5, 7)
    ref = torch.nn.RNN(5, 7, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.W_x.weight)
        ref.bias_ih_l0.copy_(layer.W_x.bias)
        ref.weight_hh_l0.copy_(layer.W_h.weight)
        ref.bias_hh_l0.zero_()
    x, h0 = torch.randn(3, 11, 5), torch.randn(3, 7)
    out, h = layer(x, h0)
    ref_out, ref_h = ref(x, h0[None])
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(h, ref_h[0], atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnn_carried_state_equals_one_pass(cell):
    model = tiny_rnn(cell)
    idx = torch.randint(0, V, (2, 15))
    full, _ = model(idx)
    a, _, state = model(idx[:, :6], return_state=True)
    b, _, _ = model(idx[:, 6:], state=state, return_state=True)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-6)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("make", ALL_MODELS)
def test_bf16_autocast_on_cpu_is_finite_and_close_to_fp32(make):
    model = make()
    idx = torch.randint(0, V, (4, 24))
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(idx, idx)
    assert loss16.dtype == torch.float32   # the loss is computed in fp32
    assert torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("make,model_type", [
    (lambda: tiny_transformer(), "transformer"),
    (lambda: tiny_transformer(tie_embeddings=False), "transformer"),
    (lambda: tiny_rnn("rnn", d_embed=24, tie_embeddings=True), "rnn"),
    (lambda: tiny_rnn("lstm"), "rnn"),
])
def test_save_load_round_trip_gives_identical_logits(tmp_path, make, model_type):
    model = make()
    idx = torch.randint(0, V, (2, 12))
    before, _ = model(idx)
    save_model(model, tmp_path / "m", model_type, model.config, extra={"step": 7})
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert info["model_type"] == model_type and info["step"] == 7
    loaded, info2 = load_model(tmp_path / "m")
    assert info2 == info and not loaded.training
    after, _ = loaded(idx)
    assert torch.equal(before, after)
    tied = model.config.tie_embeddings
    assert (loaded.head.weight is loaded.embed.weight) == tied
    assert count_parameters(loaded) == count_parameters(model)
    assert not list(tmp_path.joinpath("m").glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_flops_per_token_counts_the_matrices():
    model = tiny_transformer()
    d, L, T = TCFG["d_model"], TCFG["n_layer"], TCFG["context_length"]
    hidden = model.config.mlp_hidden
    matrices = L * (3 * d * d + d * d + 2 * d * hidden + hidden * d) + V * d   # + tied head
    assert model.flops_per_token(training=False) == 2 * matrices + 4 * L * T * d
    assert model.flops_per_token(seq_len=8) == 3 * (2 * matrices + 4 * L * 8 * d)


def test_tied_weights_are_counted_and_stored_once(tmp_path):
    tied, untied = tiny_transformer(), tiny_transformer(tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == V * TCFG["d_model"]
    save_model(tied, tmp_path / "t", "transformer", tied.config)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_slice(k).get_shape()[0] * max(1, (f.get_slice(k).get_shape() + [1])[1])
                     for k in f.keys())
    assert stored == count_parameters(tied)


def test_save_keeps_other_files_and_overwrites_atomically(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    model = tiny_transformer()
    save_model(model, out, "transformer", model.config)
    save_model(tiny_transformer(seed=1), out, "transformer", model.config)
    assert (out / "metrics.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]


def test_loading_weights_of_another_shape_names_the_file(tmp_path):
    model = tiny_transformer()
    save_model(model, tmp_path / "m", "transformer", model.config)
    cfg_path = tmp_path / "m" / "config.json"
    info = json.loads(cfg_path.read_text())
    info["config"]["d_model"] = 64          # the config now disagrees with the weights
    cfg_path.write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"model\.safetensors") as e:
        load_model(tmp_path / "m")
    assert "size mismatch" in str(e.value) or "shape" in str(e.value)


def test_loading_a_corrupt_or_missing_file_is_an_input_error(tmp_path):
    model = tiny_transformer()
    save_model(model, tmp_path / "m", "transformer", model.config)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")
    weights.unlink()
    with pytest.raises(InputError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json"):
        load_model(tmp_path / "m")
    with pytest.raises(InputError, match=r"config\.json"):
        load_model(tmp_path / "nowhere")


def test_bad_configs_are_input_errors():
    with pytest.raises(InputError, match="unknown model_type"):
        build_model("lstm", {})
    with pytest.raises(InputError, match="must divide d_model"):
        build_model("transformer", {**TCFG, "n_head": 3})
    with pytest.raises(InputError, match="extra|not permitted"):
        build_model("transformer", {**TCFG, "n_heads": 4})
    with pytest.raises(InputError, match="tie_embeddings"):
        build_model("rnn", dict(vocab_size=V, d_embed=8, d_hidden=16, tie_embeddings=True))


# ----------------------------------------------------------------------------- LoRA hooks
def test_linear_layers_have_names_peft_can_target():
    import peft
    model = tiny_transformer()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
            "head"} <= names
    idx = torch.randint(0, V, (1, 8))
    before, _ = model(idx)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv", "proj", "fc"]))
    after, _ = lora(idx)
    assert torch.allclose(before, after)    # LoRA B starts at zero
    trainable = count_parameters(lora, trainable_only=True)
    assert 0 < trainable < count_parameters(lora) // 5


# ----------------------------------------------------------------------------- learning
TEXT = b"to be or not to be, that is the question. "


def _overfit(model: torch.nn.Module, steps: int, lr: float) -> float:
    data = torch.tensor(list(TEXT * 2), dtype=torch.long) % V
    x, y = data[None, :-1][:, :32], data[None, 1:][:, :32]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model(x, y)[1].item()


def test_tiny_transformer_overfits_a_tiny_text():
    assert _overfit(tiny_transformer(), steps=150, lr=1e-2) < 0.05


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_tiny_rnn_overfits_a_tiny_text(cell):
    model = tiny_rnn(cell, n_layer=1, d_embed=32, d_hidden=64)
    assert _overfit(model, steps=200, lr=1e-2) < 0.05


def test_saved_weights_are_byte_identical_across_saves(tmp_path):
    """Tied weights + metadata must not make the safetensors header order vary per save."""
    import hashlib

    from lmpipe.models.store import build_model, save_model

    torch.manual_seed(0)
    cfg = dict(vocab_size=300, context_length=32, n_layer=1, n_head=2, d_model=32, tie_embeddings=True)
    model = build_model("transformer", cfg)
    digests = set()
    for i in range(6):
        save_model(model, tmp_path / f"m{i}", "transformer", cfg)
        digests.add(hashlib.md5((tmp_path / f"m{i}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
