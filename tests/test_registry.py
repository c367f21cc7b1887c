"""The MLflow model registry, both ways: what promotion registers (every model the pipeline
publishes, LoRA with its adapter, a decision for each), that a registry error is never read
as "no champion", and that `lmpipe generate|chat|eval` load a registered model's own bytes.

The fast tests run on a hand-made project (tests/helpers/sft.py: a tokenizer and tiny
Transformers) and a SQLite store per test. The slow one retrains the real smoke pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmpipe.cli.main import main
from lmpipe.cli.text_out import HoldingTokenizer, display_text
from lmpipe.core.files import md5_file
from lmpipe.models.sampling import generate_reply, generate_text
from lmpipe.models.store import build_model, load_model, save_model
from lmpipe.tokenizer.model import Tokenizer
from tests.helpers.sft import TINY_MODEL, make_tokenizer

MODELS = ("transformer", "sft", "lora")


# ----------------------------------------------------------------------------- a project
def _model(tok, seed: int):
    torch.manual_seed(seed)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, **TINY_MODEL))
    with torch.no_grad():          # large weights: greedy answers depend on every weight
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


def _publish(root: Path, tok, seeds: dict[str, int]) -> None:
    """data/models/{transformer,sft,lora/merged,lora/adapter} as the stages lay them out."""
    for name, seed in seeds.items():
        folder = root / "data" / "models" / name
        if name == "lora":
            adapter = folder / "adapter"
            adapter.mkdir(parents=True, exist_ok=True)
            (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "seed": seed}))
            (adapter / "adapter_model.safetensors").write_bytes(bytes([seed]) * 64)
            folder = folder / "merged"
        model = _model(tok, seed)
        save_model(model, folder, "transformer", model.config)


def _metrics(root: Path, bpb: dict[str, float]) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(
        {m: {"test_bpb": v} for m, v in bpb.items()}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); tests use their own
    registered-model prefix, or only read."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("reg", artifact_location=(base / "art").as_uri())
    return uri, exp, base / "art"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_tokenizer(root)
    return root / "data" / "tokenizer"


def _project(root: Path, tokenizer_file: Path, uri: str, mp) -> tuple[Path, Tokenizer]:
    import shutil

    shutil.copytree(tokenizer_file, root / "data" / "tokenizer")
    (root / "params.yaml").write_text("seed: 1\n")
    mp.setenv("LMPIPE_ROOT", str(root))
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)
    return root, Tokenizer.load(root / "data" / "tokenizer" / "tokenizer.model")


@pytest.fixture
def proj(tmp_path, monkeypatch, store, tokenizer_file):
    root, tok = _project(tmp_path / "proj", tokenizer_file, store[0], monkeypatch)
    return root, tok, store[0]


def _run(uri: str, exp_id: str | None = None, **tags) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = exp_id or client.get_experiment_by_name("reg").experiment_id
    return client.create_run(exp_id, tags=tags).info.run_id


def _promote(root, uri, run_id, **kw):
    from lmpipe.tracking.registry import promote_models

    return {d.model: d for d in promote_models(root, run_id, tracking_uri=uri, **kw)}


def _artifact_files(client, run_id: str, path: str) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifact_files(client, run_id, a.path) if a.is_dir else {a.path}
    return out


# ----------------------------------------------------------------------------- registering
def test_every_published_model_is_registered_lora_with_its_adapter(proj, tmp_path):
    from mlflow.tracking import MlflowClient

    root, tok, uri = proj
    _publish(root, tok, {"transformer": 1, "sft": 2, "lora": 3})
    _metrics(root, {"transformer": 3.5, "sft": 3.6, "lora": 3.55})
    run_id = _run(uri)
    decisions = _promote(root, uri, run_id, prefix="all-")
    assert {m: d.action for m, d in decisions.items()} == {m: "promoted" for m in MODELS}
    client = MlflowClient(uri)
    champ = client.get_model_version_by_alias("all-lora", "champion")
    assert champ.tags["lmpipe_model"] == "lora" and champ.tags["dvc_path"] == \
        "data/models/lora/merged"
    # the merged model is what loads; the adapter and the tokenizer travel with it
    assert _artifact_files(client, run_id, "models/lora") == {
        "models/lora/model.safetensors", "models/lora/config.json",
        "models/lora/adapter/adapter_config.json", "models/lora/adapter/adapter_model.safetensors",
        "models/lora/tokenizer/tokenizer.model", "models/lora/tokenizer/tokenizer.vocab"}
    manifest = json.loads(champ.tags["files_md5"])
    local = root / "data" / "models" / "lora"
    assert manifest["model.safetensors"] == md5_file(local / "merged" / "model.safetensors")
    assert manifest["adapter/adapter_model.safetensors"] == md5_file(
        local / "adapter" / "adapter_model.safetensors")
    assert manifest["tokenizer/tokenizer.model"] == md5_file(
        root / "data" / "tokenizer" / "tokenizer.model")
    assert champ.source.endswith("/models/lora")

    # A model the pipeline did not publish this time is reported as skipped, with the reason.
    import shutil

    shutil.rmtree(root / "data" / "models" / "sft")
    _metrics(root, {"transformer": 3.5, "lora": 3.4})
    again = _promote(root, uri, _run(uri), prefix="all-")
    assert again["sft"].action == "skipped"
    assert again["sft"].reason == "no model at data/models/sft (stage 'sft' has not published one)"
    assert again["transformer"].action == "unchanged"
    assert again["lora"].action == "unchanged"    # same files: no new version, whatever the bpb


def test_a_model_without_a_score_is_skipped_and_the_report_says_so(proj, tmp_path):
    from pipeline.retrain import promotion_markdown

    root, tok, uri = proj
    _publish(root, tok, {"transformer": 1, "sft": 2, "lora": 3})
    _metrics(root, {"transformer": 3.5, "sft": 3.6})
    decisions = _promote(root, uri, _run(uri), prefix="noscore-")
    assert decisions["lora"].action == "skipped"
    assert decisions["lora"].reason == "no bpb for lora in metrics/*.json"
    md = promotion_markdown([d.as_dict() for d in decisions.values()])
    assert "| noscore-lora |  |  | skipped | no bpb for lora in metrics/*.json |" in md


# ----------------------------------------------------------------------------- registry errors
def _outage(*_a, **_k):
    from mlflow.exceptions import MlflowException

    raise MlflowException("connection reset by peer", error_code="TEMPORARILY_UNAVAILABLE")


@pytest.mark.parametrize("broken", ["get_model_version_by_alias_and_version",
                                    "get_registered_model"])
def test_a_registry_error_is_not_no_champion(proj, tmp_path, monkeypatch, broken):
    """Reading the champion fails: the promotion step fails loudly and moves nothing, even
    for a worse model that an empty champion would have crowned."""
    from mlflow.tracking import MlflowClient

    root, tok, uri = proj
    prefix = f"{broken[:12]}-"
    _publish(root, tok, {"transformer": 1})
    _metrics(root, {"transformer": 3.0})
    first = _promote(root, uri, _run(uri), models=("transformer",), prefix=prefix)
    assert first["transformer"].action == "promoted"

    _publish(root, tok, {"transformer": 2})          # a new, worse model
    _metrics(root, {"transformer": 3.9})
    with monkeypatch.context() as m:
        if broken == "get_registered_model":
            m.setattr(MlflowClient, "get_registered_model", _outage)
        else:
            m.setattr(MlflowClient, "get_model_version_by_alias", _outage)
            m.setattr(MlflowClient, "get_model_version", _outage)
        with pytest.raises(Exception, match="connection reset by peer"):
            _promote(root, uri, _run(uri), models=("transformer",), prefix=prefix)
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias(f"{prefix}transformer", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{prefix}transformer'")] \
        == ["1"]                                       # nothing registered either
    # The registry back: the worse model is registered and kept out, as it should be.
    d = _promote(root, uri, _run(uri), models=("transformer",), prefix=prefix)["transformer"]
    assert (d.action, d.champion_version) == ("kept", "1")


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def registered_once(tmp_path_factory, store, tokenizer_file):
    """Three registered models (run `run_id`), then the project's own files moved on."""
    uri = store[0]
    with pytest.MonkeyPatch.context() as mp:
        root, tok = _project(tmp_path_factory.mktemp("reg") / "proj", tokenizer_file, uri, mp)
        return _register_then_move_on(root, tok, uri)


@pytest.fixture
def registered(registered_once, monkeypatch):
    root, uri = registered_once[:2]
    monkeypatch.setenv("LMPIPE_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    return registered_once


def _register_then_move_on(root: Path, tok, uri: str, prefix: str = "lmpipe-"):
    _publish(root, tok, {"transformer": 1, "sft": 2, "lora": 3})
    _metrics(root, {"transformer": 3.5, "sft": 3.6, "lora": 3.55})
    run_id = _run(uri)
    _promote(root, uri, run_id, prefix=prefix)
    old = {m: load_model(root / "data" / "models" / (m if m != "lora" else "lora/merged"))[0]
           for m in MODELS}
    old_tok = Tokenizer.load(root / "data" / "tokenizer" / "tokenizer.model")
    # The checkout moves on: other weights, another tokenizer (same vocabulary size).
    _publish(root, tok, {"transformer": 11, "sft": 12, "lora": 13})
    (root / "data" / "tokenizer" / "tokenizer.model").unlink()
    from lmpipe.tokenizer.model import save_tokenizer
    from lmpipe.tokenizer.training import train_tokenizer

    lines = [f"line {i} of a different corpus, with other words: {i * 7919 % 1000}"
             for i in range(300)] + ["You are a helpful assistant. system user assistant"]
    other = train_tokenizer(lines, vocab_size=tok.vocab_size)
    save_tokenizer(other, root / "data" / "tokenizer" / "tokenizer.model")
    assert other.vocab_size == tok.vocab_size and other.encode("Shout: apple") != \
        tok.encode("Shout: apple")
    return root, uri, run_id, old, old_tok


def _out(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_generate_loads_exactly_the_champion(registered, capsys):
    root, uri, run_id, old, old_tok = registered
    args = ["--prompt", "Shout: apple", "--temperature", "0", "--max-new-tokens", "12"]
    code, out, err = _out(capsys, ["generate", "--model", "models:/lmpipe-transformer@champion",
                                   *args])
    assert code == 0, err
    ids = old_tok.encode("Shout: apple")
    from lmpipe.models.sampling import generate

    new = generate(old["transformer"], [old_tok.eos_id] + ids, 12, temperature=0.0,
                   stop_ids=(old_tok.eos_id,))
    # printed as the CLI prints generated text: bytes that form no character are held back
    assert out == display_text(old_tok, ids + new)[0] + "\n"
    local = generate_text(root / "data" / "models" / "transformer", "Shout: apple",
                          max_new_tokens=12, temperature=0.0, device="cpu")
    assert out != local + "\n"                       # not the checkout's model or tokenizer
    # by version number, and by the run that registered it (a stage run of that pipeline)
    assert _out(capsys, ["generate", "--model", "models:/lmpipe-transformer/1", *args])[1] == out
    stage_run = _run(uri, dvc_stage="pretrain", **{"mlflow.parentRunId": run_id})
    assert _out(capsys, ["generate", "--model", stage_run, *args])[1] == out


def test_chat_and_eval_load_registered_models(registered, capsys, tmp_path):
    root, uri, run_id, old, old_tok = registered
    code, out, err = _out(capsys, ["chat", "--model", "models:/lmpipe-lora@champion", "--prompt",
                                   "Shout: apple", "--temperature", "0", "--max-new-tokens", "8",
                                   "--repetition-penalty", "1.0"])
    assert code == 0, err
    assert out == generate_reply(old["lora"], HoldingTokenizer(old_tok), "Shout: apple",
                                 max_new_tokens=8,
                                 temperature=0.0, repetition_penalty=1.0) + "\n"
    text = tmp_path / "t.txt"
    text.write_text("Shout: apple river\nAPPLE RIVER!\n")
    code, out, err = _out(capsys, ["eval", "--model", "models:/lmpipe-sft@champion", "--text",
                                   str(text), "--json"])
    assert code == 0, err
    from lmpipe.evaluation.scoring import score_text

    with torch.no_grad():
        ref_dir = tmp_path / "ref"
        save_model(old["sft"], ref_dir, "transformer", old["sft"].config)
        ref = score_text(ref_dir, text.read_text(), tokenizer=old_tok)
    assert json.loads(out)["bpb"] == pytest.approx(ref.bpb, rel=1e-9)
    # by the MLflow run of the stage that trained it (a child of the registering run)
    sft_run = _run(uri, dvc_stage="sft", **{"mlflow.parentRunId": run_id})
    code, by_run, err = _out(capsys, ["eval", "--model", sft_run, "--text", str(text), "--json"])
    assert code == 0, err
    assert json.loads(by_run)["bpb"] == json.loads(out)["bpb"]


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "models:/lmpipe-transformer@nope"],
     r"models:/lmpipe-transformer@nope: does not resolve: .*alias nope not found"),
    (["generate", "--model", "models:/lmpipe-gpt@champion"],
     r"models:/lmpipe-gpt@champion: does not resolve: .*lmpipe-gpt"),
    (["eval", "--model", "models:/lmpipe-sft/9", "--text", "x.txt"],
     r"models:/lmpipe-sft/9: does not resolve"),
    (["generate", "--model", "models:/lmpipe-sft"],
     r"models:/lmpipe-sft: expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    (["generate", "--model", "0" * 32], r"0{32}: no MLflow run with this id"),
    (["chat", "--model", "models:/lmpipe-transformer@champion", "--prompt", "x"],
     r"lmpipe-transformer version 1 is the registered 'transformer' model; this command takes "
     r"one of sft, lora"),
    (["chat", "--model", "RUN", "--prompt", "x"],
     r"RUN: this run registered several models; name one: models:/lmpipe-(sft|lora)/1, "
     r"models:/lmpipe-(sft|lora)/1"),
])
def test_a_reference_that_does_not_resolve_exits_2_naming_it(registered, capsys, argv, message):
    import re

    run_id = registered[2]
    argv = [a.replace("RUN", run_id) for a in argv]
    message = message.replace("RUN", run_id)
    code, out, err = _out(capsys, argv)
    assert code == 2, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_no_store_is_an_error_and_creates_none(proj, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    code, _, err = _out(capsys, ["generate", "--model", "models:/lmpipe-transformer@champion"])
    assert code == 2
    assert f"models:/lmpipe-transformer@champion: no MLflow store at {missing}" in err
    assert not missing.exists() and not missing.parent.exists()


def test_bytes_that_differ_from_the_registered_md5_are_refused(proj, store, capsys):
    root, tok, uri = proj
    run_id = _register_then_move_on(root, tok, uri, prefix="tamper-")[2]
    ref = "models:/tamper-transformer@champion"
    args = ["--prompt", "Shout", "--temperature", "0", "--max-new-tokens", "4"]
    code, good, err = _out(capsys, ["generate", "--model", ref, *args])
    assert code == 0, err
    cached = root / ".lmpipe" / "registry" / "tamper-transformer" / "1" / "model.safetensors"
    cached.write_bytes(cached.read_bytes()[:-4] + b"\0\0\0\0")   # the local copy is damaged:
    assert _out(capsys, ["generate", "--model", ref, *args])[1] == good   # fetched again
    stored = store[2] / run_id / "artifacts" / "models" / "transformer"
    weights = stored / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01                                  # the artifact store no longer holds them
    weights.write_bytes(bytes(data))
    cached.unlink()
    code, out, err = _out(capsys, ["generate", "--model", ref, *args])
    assert code == 2 and out == ""
    assert f"{ref}: model.safetensors: md5 " in err and "is not the registered" in err
    (stored / "extra.bin").write_bytes(b"x")
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))   # the bytes back
    code, _, err = _out(capsys, ["generate", "--model", ref, *args])
    assert code == 2 and f"{ref}: extra.bin: not part of the registered version" in err


# ----------------------------------------------------------------------------- the real thing
@pytest.fixture(scope="session")
def prefect_api(request):
    from tests.helpers import servers as T

    T.shared_prefect_harness(120)
    request.addfinalizer(T.close_shared_prefect_harness)


def _local_manifest(root: Path, model: str) -> dict[str, str]:
    from lmpipe.tracking.registry import version_extras, version_files

    folder = root / "data" / "models" / (model if model != "lora" else "lora/merged")
    return {rel: md5_file(f) for rel, f in version_files(folder, version_extras(model, root)).items()}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_retraining_the_smoke_pipeline_registers_all_three_and_promotes_on_merit(
        prefect_api, tmp_path, monkeypatch, mirror, capsys):
    """Three retraining runs of the real stages (smoke profile), as the nightly deployment
    runs them: the first registers and crowns all three models; the second trains a worse
    LoRA (lr x10) and leaves SFT out of the evaluation; the third a better LoRA (lr / 20)."""
    import os

    from mlflow.tracking import MlflowClient

    from pipeline.retrain import lmpipe_retrain
    from tests.helpers import servers as T

    root = T.copy_project(tmp_path / "proj", "smoke")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for key, value in {"LMPIPE_ROOT": str(root), "MLFLOW_TRACKING_URI": uri,
                       "LMPIPE_MIRROR": str(mirror),
                       "PATH": f"{T.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}.items():
        monkeypatch.setenv(key, value)
    for key in ("LMPIPE_PARENT_RUN_ID", "LMPIPE_TRACKING", "LMPIPE_PARAMS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(root)
    client = MlflowClient(uri)

    def retrain(lora_lr: float | None = None, evaluated: list[str] | None = None) -> dict:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["pipeline"]["retries"] = 0
        if lora_lr is not None:
            params["lora"]["train"].update(lr=lora_lr, min_lr=lora_lr / 10)
        params["evaluate"]["models"] = evaluated or ["ngram", "rnn", "transformer", "sft", "lora"]
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        report = lmpipe_retrain(root=str(root))
        decisions = {d["model"]: d for d in report["promotion"]}
        assert list(decisions) == list(MODELS)          # a decision for every model, always
        for d in decisions.values():                   # the rule, wherever a version was judged
            if d["action"] in ("promoted", "kept") and d["champion_bpb"] is not None:
                assert (d["action"] == "promoted") == (d["bpb"] < d["champion_bpb"]), d
        return decisions

    def champion(model: str):
        return client.get_model_version_by_alias(f"lmpipe-{model}", "champion")

    first = retrain()
    assert {m: d["action"] for m, d in first.items()} == {m: "promoted" for m in MODELS}
    for model in MODELS:
        mv = champion(model)
        assert json.loads(mv.tags["files_md5"]) == _local_manifest(root, model), model
        assert mv.tags["bpb_source"] == "evaluate.test_bpb"
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "model.safetensors", "tokenizer/tokenizer.model"} <= set(
        json.loads(champion("lora").tags["files_md5"]))

    worse = retrain(lora_lr=0.02, evaluated=["ngram", "rnn", "transformer", "lora"])
    assert worse["transformer"]["action"] == "unchanged"
    assert (worse["sft"]["action"], worse["sft"]["reason"]) == (
        "skipped", "no bpb for sft in metrics/*.json")
    assert worse["lora"]["action"] == "kept", worse["lora"]
    assert worse["lora"]["bpb"] > first["lora"]["bpb"]
    assert str(champion("lora").version) == first["lora"]["version"] == "1"

    better = retrain(lora_lr=1e-4)
    assert better["lora"]["action"] == "promoted", better["lora"]
    assert better["lora"]["bpb"] < first["lora"]["bpb"]
    assert str(champion("lora").version) == better["lora"]["version"] == "3"
    assert {better["transformer"]["action"], better["sft"]["action"]} == {"unchanged"}
    assert {str(champion(m).version) for m in ("transformer", "sft")} == {"1"}

    # The champion loads as the checkout's own LoRA model (the same bytes, md5-checked).
    args = ["--prompt", "Hi.", "--temperature", "0",
            "--max-new-tokens", "16"]
    assert main(["chat", "--model", "models:/lmpipe-lora@champion", *args]) == 0
    from_registry = capsys.readouterr().out
    assert main(["chat", "--model", "lora", *args]) == 0
    assert from_registry == capsys.readouterr().out
