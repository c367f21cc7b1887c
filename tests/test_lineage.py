"""`lmpipe lineage`: chains from dvc.lock back to the source checksum, and --verify.

The fast tests use stand-in stages; the acceptance test uses the deployed smoke run of
tests/test_worker.py (pipeline.testing.deployed_smoke_run, shared per session).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from lmpipe.core.errors import InputError
from lmpipe.tracking.lineage import chain_of, lineage, producer_of, verify
from tests.helpers import servers as T

LOCK = {
    "download": {"cmd": "python -m stages.download",
                 "params": {"params.yaml": {"download.files": [
                     {"sha256": "a" * 64, "filename": "x.txt"}]}},
                 "outs": [{"path": "data/corpus", "md5": "c.dir"}]},
    "tokenizer": {"cmd": "python -m stages.tokenizer",
                  "deps": [{"path": "data/corpus/train.parquet", "md5": "t"}],
                  "outs": [{"path": "data/tokenizer", "md5": "k.dir"},
                           {"path": "data/tokens", "md5": "n.dir"}]},
    "pretrain": {"cmd": "python -m stages.pretrain",
                 "deps": [{"path": "data/tokens", "md5": "n.dir"},
                          {"path": "lmpipe/train/trainer.py", "md5": "code"}],
                 "outs": [{"path": "data/models/transformer", "md5": "m.dir"}]},
    "ngram": {"cmd": "python -m stages.ngram", "deps": [{"path": "data/tokens", "md5": "n.dir"}],
              "outs": [{"path": "data/models/ngram", "md5": "g.dir"}]},
}


def test_chain_from_lock():
    assert producer_of(LOCK, "data/models/transformer/model.safetensors") == (
        "pretrain", "data/models/transformer")
    assert producer_of(LOCK, "data/corpus/train.parquet") == ("download", "data/corpus")
    assert producer_of(LOCK, "lmpipe/train/trainer.py") is None
    assert chain_of(LOCK, ["pretrain"]) == ["download", "tokenizer", "pretrain"]
    assert chain_of(LOCK, ["pretrain", "ngram"]) == ["download", "tokenizer", "ngram", "pretrain"]


def test_lineage_and_verify_on_stand_in_stages(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    root = T.make_fake_project(tmp_path / "p", {"download": [], "tokenizer": ["download"],
                                                "pretrain": ["tokenizer"]})
    T.sh([str(T.BIN / "dvc"), "repro", "-q"], root)
    report = lineage(root, "transformer", tracking_uri=mlflow_uri)
    assert [n["stage"] for n in report["chain"]] == ["download", "tokenizer", "pretrain"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert report["chain"][-1]["outs"][0]["md5"] == lock["pretrain"]["outs"][0]["md5"]
    assert report["chain"][-1]["params"] == {"params.yaml": {"fake.pretrain": 1}}
    with pytest.raises(InputError, match="not a DVC out"):
        lineage(root, "README.md", with_mlflow=False)

    assert verify(root)["ok"]
    model = root / "data" / "models" / "transformer" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[7] ^= 0xFF
    model.write_bytes(bytes(data))
    (root / "metrics" / "tokenizer.json").write_text("{}")
    report = verify(root)
    assert not report["ok"]
    assert {(p["path"], p["stage"]) for p in report["files"]} == {
        ("data/models/transformer/model.safetensors", "pretrain"),
        ("metrics/tokenizer.json", "tokenizer")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, mirror):
    run = T.deployed_smoke_run(tmp_path_factory.mktemp("smoke"), mirror)
    # A stage that failed (tests/test_worker.py says which) leaves the others traceable.
    if not (run["root"] / "dvc.lock").exists():
        pytest.fail(f"the deployed smoke run wrote no dvc.lock ({run['state']}); "
                    "see tests/test_worker.py")
    return run


def _lmpipe(root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(T.BIN / "lmpipe"), *args], cwd=root, capture_output=True,
                          text=True, env=env)


@pytest.mark.slow
@pytest.mark.timeout(1800)   # may set up the session's deployed smoke run (tests/test_worker.py)
def test_every_model_traces_back_to_the_corpus_sha256(smoke):
    root = smoke["root"]
    env = smoke["env"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    expected = {f["sha256"] for f in params["download"]["files"]}
    assert expected and all(len(h) == 64 for h in expected)
    # Every model the pipeline has, and the token files every model reads.
    from lmpipe.core.names import MODELS

    targets = list(MODELS) + [o["path"] for e in lock.values() for o in e.get("outs") or []
                              if o["path"].startswith("data/tokens")]
    assert "data/tokens" in targets
    for target in targets:
        proc = _lmpipe(root, "lineage", target, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        roots = [n for n in report["chain"] if not n["upstream"]]
        assert [n["stage"] for n in roots] == ["download"], target
        assert expected <= set(roots[0]["source_sha256"]), (target, roots[0])
        for node in report["chain"]:
            assert node["cmd"] and node["outs"]
            assert node["mlflow_runs"], f"no MLflow run found for stage {node['stage']}"
        assert report["pipeline_run"] is not None  # the flow run that wrote this dvc.lock
    text = _lmpipe(root, "lineage", targets[0], env=env).stdout
    assert "[download]" in text and "source sha256:" in text


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_verify_names_a_tampered_model_file(smoke):
    root = smoke["root"]
    env = smoke["env"]
    ok = _lmpipe(root, "lineage", "--verify", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    victim = root / "data" / "models" / "transformer" / "model.safetensors"
    original = victim.read_bytes()
    try:
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        bad = _lmpipe(root, "lineage", "--verify", env=env)
        assert bad.returncode == 1
        rel = victim.relative_to(root).as_posix()
        assert f"MISMATCH {rel}" in bad.stderr, bad.stderr
    finally:
        victim.write_bytes(original)
    assert _lmpipe(root, "lineage", "--verify", env=env).returncode == 0
