"""LoRA: peft adapters on the project's Transformer, PEFT-format save/load, merge, the stage."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe.core.errors import InputError
from lmpipe.finetune.lora import (
    ADAPTER_FILES,
    add_lora,
    load_adapter,
    merge,
    save_adapter,
    target_modules,
)
from lmpipe.models.store import build_model, load_model, save_model, trainable_summary
from lmpipe.models.transformer import Transformer, TransformerConfig

CFG = dict(vocab_size=61, context_length=32, n_layer=2, n_head=2, d_model=32, dropout=0.0)


def base(seed=0, **over):
    torch.manual_seed(seed)
    return build_model("transformer", {**CFG, **over}).eval()


def x_batch():
    return torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def test_targets_follow_params():
    assert target_modules(["attn.qkv", "attn.proj"], include_mlp=False) == ["attn.qkv", "attn.proj"]
    assert target_modules(["attn.qkv"], include_mlp=True) == ["attn.qkv", "mlp.fc", "mlp.proj"]


def test_lora_freezes_base_and_starts_as_the_base_model():
    ref = base()
    with torch.no_grad():
        want, _ = ref(x_batch())
    pm = add_lora(base(), r=4, alpha=8, dropout=0.0, targets=["attn.qkv", "attn.proj"])
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * CFG["n_layer"]          # A and B, 2 targets, per layer
    # B is zero-initialised: the adapted model computes exactly the base function
    assert all(float(p.detach().abs().max()) == 0 for n, p in pm.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        got, _ = pm(x_batch())
    assert torch.equal(got, want)
    s = trainable_summary(pm)
    d, r, L = CFG["d_model"], 4, CFG["n_layer"]
    expect = L * (r * (d + 3 * d) + r * (d + d))              # qkv: A r*d, B 3d*r; proj: A r*d, B d*r
    assert s["trainable_params"] == expect
    assert s["trainable_pct"] == pytest.approx(100 * expect / s["total_params"])
    with_mlp = add_lora(base(), r=4, alpha=8, dropout=0.0,
                        targets=target_modules(["attn.qkv", "attn.proj"], True))
    names = {n for n, p in with_mlp.named_parameters() if p.requires_grad}
    assert any(".mlp.fc.lora_A." in n for n in names) and any(".mlp.proj.lora_B." in n for n in names)


def test_unknown_target_is_an_input_error():
    with pytest.raises(InputError, match=r"lora.target_modules: no linear layer named 'attn.q'"):
        add_lora(base(), r=2, alpha=4, dropout=0.0, targets=["attn.q"])


def _train_a_little(pm, steps=5):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    x = x_batch()
    for _ in range(steps):
        _, loss = pm(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_roundtrip_and_merge_equal_base_plus_adapter(tmp_path, tied):
    pm = add_lora(base(tie_embeddings=tied), r=4, alpha=16, dropout=0.1,
                  targets=["attn.qkv", "attn.proj", "mlp.fc"])
    _train_a_little(pm)
    with torch.no_grad():
        want, _ = pm(x_batch())
        plain, _ = base(tie_embeddings=tied)(x_batch())
    assert (want - plain).abs().max() > 1e-3                 # the adapter changed the model
    size = save_adapter(pm, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted(ADAPTER_FILES)
    assert size == sum((tmp_path / "adapter" / f).stat().st_size for f in files)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["attn.proj", "attn.qkv", "mlp.fc"]

    # PEFT's own loader on a fresh base model gives the same function
    from peft import PeftModel

    loaded = load_adapter(base(tie_embeddings=tied), tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        got, _ = loaded(x_batch())
    assert torch.allclose(got, want, atol=1e-6)

    # merged: a plain Transformer whose outputs equal base + adapter within tolerance
    merged = merge(loaded)
    assert type(merged) is Transformer and type(merged.config) is TransformerConfig
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got_m, _ = merged(x_batch())
    assert torch.allclose(got_m, want, atol=1e-4), float((got_m - want).abs().max())
    save_model(merged, tmp_path / "merged", "transformer", merged.config)
    reloaded, info = load_model(tmp_path / "merged")
    assert info["model_type"] == "transformer"
    with torch.no_grad():
        got_r, _ = reloaded(x_batch())
    assert torch.equal(got_r, got_m)
    # the adapter is small next to the model
    merged_bytes = (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert size < merged_bytes / 2


SAVE_AN_ADAPTER = """
import sys, torch
from lmpipe.finetune.lora import add_lora, save_adapter
from lmpipe.models.store import build_model
torch.manual_seed(0)
model = build_model("transformer", dict(vocab_size=40, context_length=16, n_layer=1, n_head=2,
                                        d_model=16))
torch.manual_seed(1)
save_adapter(add_lora(model, r=2, alpha=4, dropout=0.0,
                      targets=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]), sys.argv[1])
"""


def test_the_saved_adapter_does_not_depend_on_the_string_hash_seed(tmp_path):
    """peft keeps target_modules in a set; the saved config must not follow the set's
    process-dependent order (two processes with different PYTHONHASHSEED, the same bytes)."""
    import os
    import subprocess
    import sys

    out = {}
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", SAVE_AN_ADAPTER, str(tmp_path / seed)], env=env,
                       check=True, timeout=300)
        out[seed] = {f: (tmp_path / seed / f).read_bytes() for f in ADAPTER_FILES}
    assert out["1"] == out["2"] == out["3"]
    assert json.loads(out["1"]["adapter_config.json"])["target_modules"] == [
        "attn.proj", "attn.qkv", "mlp.fc", "mlp.proj"]


def test_load_adapter_names_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not a LoRA adapter"):
        load_adapter(base(), tmp_path / "nothing")


# ----------------------------------------------------------------------------- the stage
def test_lora_stage_end_to_end(project, monkeypatch):
    import shutil

    from peft import PeftModel
    from test_sft import mlflow_artifacts, tiny_params

    from lmpipe.data.corpus import read_instruct_rows
    from lmpipe.finetune.batches import pad_batch
    from lmpipe.finetune.examples import build_examples, example_max_len
    from lmpipe.tokenizer.model import Tokenizer
    from stages import lora
    from tests.helpers.sft import make_project

    make_project(project)
    params = tiny_params()
    m = lora.run(params)
    assert json.loads((project / "metrics" / "lora.json").read_text()) == m
    assert m["steps"] == 48 and m["train_examples"] == 96
    assert m["val_response_ppl"] < m["base_val_response_ppl"]
    d, r, L = 48, 4, 2                                    # tests/sft_helpers.TINY_MODEL, r
    assert m["trainable_params"] == L * (r * (d + 3 * d) + r * (d + d))
    assert m["trainable_pct"] == pytest.approx(100 * m["trainable_params"]
                                               / (m["params"] + m["trainable_params"]), rel=1e-5)
    out = project / "data" / "models" / "lora"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(ADAPTER_FILES)
    assert m["adapter_bytes"] == sum(p.stat().st_size for p in (out / "adapter").iterdir())
    assert m["adapter_bytes"] < m["model_bytes"] / 5
    assert 0 < m["merged_max_abs_diff"] < 1e-4

    # base + adapter (PEFT's loader) == merged model, on held-out batches
    base, _ = load_model(project / "data" / "models" / "transformer")
    merged, info = load_model(out / "merged")
    assert info["lora"]["r"] == 4 and info["stage"] == "lora"
    with_adapter = load_adapter(load_model(project / "data" / "models" / "transformer")[0],
                                out / "adapter")             # PeftModel.from_pretrained
    assert isinstance(with_adapter, PeftModel)
    tok = Tokenizer.load()
    val = build_examples(tok, read_instruct_rows(project / "data" / "instruct" / "val.parquet"),
                         example_max_len(512, merged.config.context_length)).examples
    x, _ = pad_batch(val, tok.pad_id)
    with torch.no_grad():
        want, _ = with_adapter(x)
        got, _ = merged(x)
        plain, _ = base(x)
    assert torch.allclose(got, want, atol=1e-4) and (want - plain).abs().max() > 1e-2
    # base weights frozen: every weight LoRA does not target is bit-for-bit the base's
    sb, sm = base.state_dict(), merged.state_dict()
    for name in sb:
        targeted = name.endswith(("attn.qkv.weight", "attn.proj.weight"))
        assert torch.equal(sb[name], sm[name]) != targeted, name

    run, names, text = mlflow_artifacts("lora")
    assert "samples.md" in names and "**lora**" in text
    assert run.data.metrics["adapter_bytes"] == m["adapter_bytes"]

    # same params, no checkpoint to resume from: byte-identical adapter
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(project / "data" / "checkpoints" / "lora")
    m2 = lora.run(params)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert m2["val_response_loss"] == m["val_response_loss"]
