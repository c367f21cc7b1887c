"""The checkout itself is a valid DVC project whose graph holds every stage, in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lmpipe.core.names import CHECK_STAGE, STAGES
from tests.conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


def test_checkout_is_a_dvc_repo_with_every_stage():
    assert (REPO / ".dvc" / "config").exists(), "run `dvc init` at the project root"
    proc = subprocess.run([DVC, "dag", "--md"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages == [CHECK_STAGE, *STAGES]
    for stage in stages:
        assert (REPO / "stages" / f"{stage}.py").exists(), stage


def test_every_stage_lists_only_its_own_params_sections():
    """Changing pretrain.lr must re-run pretrain and its dependents, nothing upstream."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert spec[CHECK_STAGE]["params"] == [{"params.yaml": None}]   # the check reads it all
    for stage, body in spec.items():
        if stage == CHECK_STAGE:
            continue
        assert set(body["params"]) <= {"seed", stage}, (stage, body["params"])


def test_every_stage_runs_after_the_params_check_and_none_persists_an_out():
    """The params stage is upstream of every stage (DVC runs it first, so a typo stops the
    run before any out is deleted), and no other stage has a `persist: true` out, which
    would keep it out of DVC's run cache."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stamp = spec[CHECK_STAGE]["outs"][0]
    assert list(stamp) == [".lmpipe/params-checked"] and stamp[".lmpipe/params-checked"]["persist"]
    for stage in STAGES:
        assert ".lmpipe/params-checked" in spec[stage]["deps"], stage
        for out in spec[stage].get("outs") or []:
            opts = next(iter(out.values())) if isinstance(out, dict) else {}
            assert not (opts or {}).get("persist"), (stage, out)
