"""params.yaml validation: typed sections, unknown keys rejected, errors name the key path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lmpipe.core.errors import InputError
from lmpipe.core.params import Params, load_params, validate_params
from lmpipe.core.profiles import (
    available_profiles,
    default_params_dict,
    dump_params,
    profile_dict,
)
from tests.conftest import REPO


def _with(path: str, value):
    """Default params with one dotted key replaced."""
    params = default_params_dict()
    node = params
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return params


def test_committed_params_yaml_is_the_default_profile():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == default_params_dict(), "run `lmpipe profile default` to regenerate"


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_validates(name):
    params = validate_params(profile_dict(name))
    assert isinstance(params, Params)


def test_profiles_differ_where_they_should():
    smoke, gpu = profile_dict("smoke"), profile_dict("gpu")
    assert smoke["tokenizer"]["vocab_size"] < default_params_dict()["tokenizer"]["vocab_size"]
    assert gpu["tokenizer"]["vocab_size"] > default_params_dict()["tokenizer"]["vocab_size"]


def test_vocab_too_small_names_the_key_and_value():
    with pytest.raises(InputError) as err:
        validate_params(_with("tokenizer.vocab_size", 12))
    assert "tokenizer.vocab_size: must be >= 256" in str(err.value)
    assert "got 12" in str(err.value)


def test_unknown_key_is_rejected_with_its_path():
    params = default_params_dict()
    params["tokenizer"]["vocab_sise"] = 512
    with pytest.raises(InputError) as err:
        validate_params(params)
    assert "tokenizer.vocab_sise: unknown key" in str(err.value)


def test_unknown_section_is_rejected():
    params = default_params_dict()
    params["tokeniser"] = {}
    with pytest.raises(InputError, match=r"tokeniser: unknown key"):
        validate_params(params)


def test_wrong_type_names_the_key():
    with pytest.raises(InputError) as err:
        validate_params(_with("tokenizer.vocab_size", "large"))
    msg = str(err.value)
    assert "tokenizer.vocab_size" in msg and "integer" in msg and "'large'" in msg


def test_out_of_range_fraction_names_the_key():
    with pytest.raises(InputError, match=r"download\.split\.val: must be > 0(\.0)?, got -0\.1"):
        validate_params(_with("download.split.val", -0.1))


def test_split_fractions_must_sum_to_one():
    params = _with("download.split.train", 0.5)
    with pytest.raises(InputError, match=r"download\.split: train \+ val \+ test must sum to 1"):
        validate_params(params)


def test_bad_checksum_format_names_the_list_index():
    params = default_params_dict()
    params["download"]["files"][0]["sha256"] = "abc"
    with pytest.raises(InputError, match=r"download\.files\.0\.sha256"):
        validate_params(params)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ntokenizer:\n  vocab_size: [1, 2\n")
    with pytest.raises(InputError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(InputError, match="available: default"):
        profile_dict("tiny")


def test_profile_command_writes_a_loadable_params_file(tmp_path):
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "profile", "smoke", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert load_params(out).model_dump(mode="json") == profile_dict("smoke")
    # Written by the same dumper as the committed default, so diffs stay minimal.
    assert out.read_text() == dump_params(profile_dict("smoke"))


def test_stage_exits_2_before_any_work_on_bad_params(tmp_path):
    """A stage never starts work on invalid params: exit 2 and the key path on stderr."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(_with("tokenizer.vocab_size", 12))
    )
    code = (
        "from lmpipe.core.stage import run_stage\n"
        "import sys\n"
        "def work(p):\n"
        "    open('touched', 'w').write('x')\n"
        "sys.exit(run_stage('tokenizer', work))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
        env={**__import__("os").environ, "LMPIPE_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "stage tokenizer: error:" in proc.stderr
    assert "tokenizer.vocab_size: must be >= 256" in proc.stderr
    assert not (tmp_path / "touched").exists()
