"""Sampling rules (temperature, top-k, top-p, repetition penalty) and generation for both models."""

from __future__ import annotations

import pytest
import torch

from lmpipe.core.errors import InputError
from lmpipe.models.sampling import generate, generate_text, sample_next
from lmpipe.models.store import build_model, save_model

# tiny tensors gain nothing from threads (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


V = 29
CTX = 48


def transformer(seed: int = 0):
    torch.manual_seed(seed)
    # a larger init than the default 0.02 so greedy decoding is not a constant token
    m = build_model("transformer", dict(vocab_size=V, context_length=CTX, n_layer=2, n_head=2,
                                        d_model=32, dropout=0.0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


def rnn(cell: str = "rnn", seed: int = 0):
    torch.manual_seed(seed)
    return build_model("rnn", dict(vocab_size=V, cell=cell, n_layer=2, d_embed=16,
                                   d_hidden=32)).eval()


def freqs(samples: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(samples, minlength=n).double() / samples.numel()


# ----------------------------------------------------------------------------- sample_next
def test_temperature_zero_and_top_k_one_are_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), greedy)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_plain_sampling_follows_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(40000, 1)
    for temp in (1.0, 0.5, 2.0):
        g = torch.Generator().manual_seed(1)
        got = freqs(sample_next(logits, temperature=temp, generator=g), 4)
        want = torch.softmax(logits[0].double() / temp, -1)
        assert torch.allclose(got, want, atol=0.01), (temp, got, want)


def test_top_k_keeps_only_the_k_most_likely_renormalised():
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0, -1.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(2)
    got = freqs(sample_next(logits, top_k=2, generator=g), 5)
    want = torch.zeros(5, dtype=torch.double)
    want[[1, 3]] = torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.double), -1)
    assert torch.allclose(got, want, atol=0.01)
    assert got[[0, 2, 4]].sum() == 0


@pytest.mark.parametrize("p,kept", [(0.45, [0]), (0.5, [0]), (0.79, [0, 1]), (0.81, [0, 1, 2]),
                                    (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])        # shuffled, so the rule cannot rely on the order
    logits = probs.log()[perm][None].repeat(40000, 1)
    g = torch.Generator().manual_seed(3)
    got = freqs(sample_next(logits, top_p=p, generator=g), 4)
    want = torch.zeros(4, dtype=torch.double)
    kept_pos = [int((perm == i).nonzero()) for i in kept]
    want[kept_pos] = probs[kept].double() / probs[kept].double().sum()
    assert torch.allclose(got, want, atol=0.01), (p, got, want)


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[0, 1, 0]])            # token 0 twice: penalised once, not twice
    # positive logits are divided, negative ones multiplied: [1.0, -2.0, 0.5, 0.0]
    penalised = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.double)
    g = torch.Generator().manual_seed(4)
    got = freqs(sample_next(logits.repeat(40000, 1), repetition_penalty=2.0,
                            generated=seen.repeat(40000, 1), generator=g), 4)
    assert torch.allclose(got, torch.softmax(penalised, -1), atol=0.01)
    # strong enough, it changes the greedy choice; 1.0 changes nothing
    assert sample_next(logits, 0.0, repetition_penalty=5.0, generated=seen).item() == 2
    assert sample_next(logits, 0.0, repetition_penalty=1.0, generated=seen).item() == 0


def test_same_generator_seed_gives_the_same_samples():
    logits = torch.randn(8, 100)
    a = sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(repetition_penalty=0.0)])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 4), **kwargs)


# ----------------------------------------------------------------------------- generate
def test_greedy_generation_with_kv_cache_equals_without():
    model = transformer()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    new = CTX - len(prompt)                    # fill the context exactly
    cached = generate(model, prompt, new, temperature=0.0, use_cache=True)
    plain = generate(model, prompt, new, temperature=0.0, use_cache=False)
    assert len(cached) == new and len(set(cached)) > 3
    assert cached == plain
    # the logits along the way agree too (fp32)
    seq = torch.tensor([prompt + cached[:-1]])
    full, _ = model(seq)
    cache = model.new_kv_cache(1, seq.shape[1])
    steps = [model(seq[:, :len(prompt)], kv_cache=cache)[0]]
    steps += [model(seq[:, i:i + 1], kv_cache=cache)[0] for i in range(len(prompt), seq.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_sampled_generation_with_kv_cache_equals_without_and_is_seeded():
    model = transformer(seed=1)
    kw = dict(temperature=0.9, top_k=10, top_p=0.95, repetition_penalty=1.3, seed=11)
    a = generate(model, [1, 2, 3], 30, use_cache=True, **kw)
    b = generate(model, [1, 2, 3], 30, use_cache=False, **kw)
    assert a == b
    assert a == generate(model, [1, 2, 3], 30, use_cache=True, **kw)
    assert a != generate(model, [1, 2, 3], 30, use_cache=True, **{**kw, "seed": 12})


def test_generation_past_the_context_keeps_going():
    model = transformer()
    for use_cache in (True, False):
        out = generate(model, [1, 2, 3], CTX * 2, temperature=0.0, use_cache=use_cache)
        assert len(out) == CTX * 2
        assert all(0 <= t < V for t in out)


def test_a_prompt_that_fills_the_context_is_an_input_error_with_counts():
    model = transformer()
    with pytest.raises(InputError, match=f"{CTX} tokens.*context is {CTX} tokens.*no room"):
        generate(model, [1] * CTX, 5)
    assert len(generate(model, [1] * (CTX - 1), 5, temperature=0.0)) == 5
    with pytest.raises(InputError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(InputError, match="token ids"):
        generate(model, [V], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)
    assert generate(model, [1], 0) == []


def test_stop_ids_end_generation_without_the_stop_token():
    model = transformer()
    free = generate(model, [1, 2], 20, temperature=0.0)
    stop = free[5]
    first = free.index(stop)
    assert generate(model, [1, 2], 20, temperature=0.0, stop_ids=(stop,)) == free[:first]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnn_generation_with_carried_state_equals_full_recompute(cell):
    model = rnn(cell)
    prompt = [4, 8, 15, 16, 23]
    out = generate(model, prompt, 25, temperature=0.0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert out == seq[len(prompt):]
    assert len(generate(model, [1], 200, temperature=1.0)) == 200   # no context limit


def test_generate_restores_training_mode_and_accepts_wrapped_models():
    model = transformer().train()
    generate(model, [1, 2], 3)
    assert model.training
    import peft
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv", "fc"]))
    assert generate(lora, [1, 2], 6, temperature=0.0) == generate(transformer(), [1, 2], 6,
                                                                    temperature=0.0)


def test_cpu_generation_runs_on_one_thread_and_gives_the_threads_back():
    """At batch 1 a second thread costs more than it brings (lmpipe.models.sampling.decode_threads);
    the caller's thread count comes back afterwards, also when generation fails midway."""
    model = transformer()
    seen: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    assert len(generate(model, [1, 2, 3], 5, temperature=0.0)) == 5
    assert seen and set(seen) == {1}            # the prefill and every decode step
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1, 2, 3], 5, temperature=-1.0)   # raises inside the decode loop
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- generate_text
class FakeTokenizer:
    """Characters a..z are ids 1..26, EOS is 0."""

    eos_id = 0

    @classmethod
    def load(cls, path=None):
        return cls()

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 96 for c in text]

    def decode(self, ids) -> str:
        return "".join("" if i == 0 or i > 26 else chr(i + 96) for i in ids)


@pytest.fixture
def fake_tokenizer(monkeypatch):
    monkeypatch.setattr("lmpipe.models.sampling.Tokenizer", FakeTokenizer)


def test_generate_text_loads_the_model_and_continues_the_prompt(tmp_path, fake_tokenizer):
    model = transformer()
    save_model(model, tmp_path / "m", "transformer", model.config)
    text = generate_text(tmp_path / "m", "abc", max_new_tokens=10, temperature=0.0, device="cpu")
    # the prompt is read as the start of a document: [EOS] + prompt
    ids = generate(model, [0, 1, 2, 3], 10, temperature=0.0, stop_ids=(0,))
    assert text == "abc" + FakeTokenizer().decode(ids)
    empty = generate_text(tmp_path / "m", "", max_new_tokens=5, temperature=0.0, device="cpu")
    assert empty == FakeTokenizer().decode(generate(model, [0], 5, temperature=0.0, stop_ids=(0,)))
    # CTX - 2 prompt tokens + EOS leave one position (and the cache then slides); CTX - 1 none
    edge = generate_text(tmp_path / "m", "a" * (CTX - 2), max_new_tokens=3, device="cpu")
    ids = generate(model, [0] + [1] * (CTX - 2), 3, temperature=0.8, stop_ids=(0,), seed=0)
    assert ids and edge == "a" * (CTX - 2) + FakeTokenizer().decode(ids)
    with pytest.raises(InputError, match=f"{CTX - 1} tokens \\({CTX} with the EOS.*context is "
                                         f"{CTX} tokens.*no room"):
        generate_text(tmp_path / "m", "a" * (CTX - 1), device="cpu")


def test_generate_text_with_an_rnn_and_sampling_is_seeded(tmp_path, fake_tokenizer):
    model = rnn("gru")
    save_model(model, tmp_path / "r", "rnn", model.config)
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=3, device="cpu")
    a = generate_text(tmp_path / "r", "tobe", **kw)
    assert a.startswith("tobe") and a == generate_text(tmp_path / "r", "tobe", **kw)


def test_generate_text_with_the_project_tokenizer(tmp_path, mirror):
    from lmpipe.tokenizer.training import train_tokenizer

    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    tok = train_tokenizer(text.split("\n\n"), vocab_size=400, model_prefix=tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, context_length=32,
                                            n_layer=1, n_head=2, d_model=16))
    save_model(model, tmp_path / "m", "transformer", model.config)
    out = generate_text(tmp_path / "m", "First Citizen:", max_new_tokens=8, temperature=0.0,
                        tokenizer_path=tmp_path / "tok.model", device="cpu")
    ids = generate(model, [tok.eos_id] + tok.encode("First Citizen:"), 8, temperature=0.0,
                   stop_ids=(tok.eos_id,))
    assert out == tok.decode(tok.encode("First Citizen:") + ids)
    assert out.startswith("First Citizen:")
    with pytest.raises(InputError, match=r"tokens \(\d+ with the EOS.*context is 32 tokens"):
        generate_text(tmp_path / "m", text[:2000], tokenizer_path=tmp_path / "tok.model",
                      device="cpu")
