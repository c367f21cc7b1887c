"""The checkout itself is a valid DVC project whose graph holds every stage, in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lmpipe.core.names import STAGES
from tests.conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


def test_checkout_is_a_dvc_repo_with_every_stage():
    assert (REPO / ".dvc" / "config").exists(), "run `dvc init` at the project root"
    proc = subprocess.run([DVC, "dag", "--md"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages == list(STAGES)
    for stage in STAGES:
        assert (REPO / "stages" / f"{stage}.py").exists(), stage


def test_every_stage_lists_only_its_own_params_sections():
    """Changing pretrain.lr must re-run pretrain and its dependents, nothing upstream."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, body in spec.items():
        assert set(body["params"]) <= {"seed", stage}, (stage, body["params"])
