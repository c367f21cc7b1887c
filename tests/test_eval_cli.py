"""`lmpipe eval --model NAME --text FILE`: the library's figures, clear errors, exit codes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_evaluate import (  # noqa: F401  (session fixtures)
    CTX,  # noqa: F401  (shared assets: tests/test_evaluate.py)
    assets,
    tok,
)

from lmpipe.cli.main import main
from lmpipe.core.paths import model_dir
from lmpipe.evaluation.scoring import score_text

TEXT = "KING HENRY:\nOnce more unto the breach, dear friends, once more;\nÉté — naïve café.\n"


@pytest.fixture
def cli_project(project, assets):  # noqa: F811
    shutil.copytree(assets / "data", project / "data")
    return project


@pytest.mark.parametrize("model", ["transformer", "rnn", "lora"])
def test_eval_prints_the_library_figures(cli_project, tok, capsys, model):  # noqa: F811
    path = cli_project / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    expected = score_text(model_dir(model), TEXT, tokenizer=tok)

    assert main(["eval", "--model", model, "--text", str(path)]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"perplexity\s+([0-9.]+)", out).group(1))
    bpb = float(re.search(r"bits per byte\s+([0-9.]+)", out).group(1))
    assert ppl == pytest.approx(expected.ppl, rel=1e-6)
    assert bpb == pytest.approx(expected.bpb, rel=1e-6)
    assert f"{expected.n_tokens} tokens, {len(TEXT.encode())} bytes" in out

    assert main(["eval", "--model", model, "--text", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ppl"] == pytest.approx(expected.ppl, rel=1e-9)
    assert data["bpb"] == pytest.approx(expected.bpb, rel=1e-9)
    assert data["bytes"] == len(TEXT.encode("utf-8")) and data["tokens"] == expected.n_tokens
    # each figure once, under one name (no `bpb` beside `text_bpb`)
    assert set(data) == {"model", "file", "ppl", "bpb", "loss", "tokens", "bytes",
                         "tokens_per_second", "seconds", "warning"}


def test_eval_stride_option_matches_the_library(cli_project, tok, capsys):  # noqa: F811
    path = cli_project / "long.txt"
    text = TEXT * 6
    path.write_text(text, encoding="utf-8")
    folder = cli_project / "data" / "models" / "transformer"
    plain = score_text(folder, text, tokenizer=tok)
    sliding = score_text(folder, text, tokenizer=tok, stride=8)
    assert plain.n_tokens > CTX and sliding.total_nll != pytest.approx(plain.total_nll, rel=1e-9)
    assert main(["eval", "--model", "transformer", "--text", str(path), "--stride", "8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(sliding.ppl, rel=1e-9)


def test_unknown_model_exits_2(cli_project, capsys):
    path = cli_project / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", "gpt5", "--text", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt5'" in err and "transformer" in err


def test_untrained_model_exits_2_naming_the_stage(cli_project, capsys):
    shutil.rmtree(cli_project / "data" / "models" / "sft")
    path = cli_project / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", "sft", "--text", str(path)]) == 2
    assert "dvc repro sft" in capsys.readouterr().err


def test_non_utf8_file_exits_2_naming_the_byte_offset(cli_project, capsys):
    path = cli_project / "latin1.txt"
    path.write_bytes("abc\ncaf\u00e9\n".encode("latin-1"))   # 0xe9 at byte offset 7
    assert main(["eval", "--model", "transformer", "--text", str(path)]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt" in err and "not UTF-8" in err and "byte offset 7" in err


@pytest.mark.parametrize("setup,args,message", [
    ("missing", [], "file not found"),
    ("empty", [], "the file is empty"),
    ("ok", ["--stride", "0"], "--stride: must be >= 1"),
    ("ok", ["--stride", "999"], "--stride: must be in [1, context_length=64]"),
    ("ok", ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu9"],
     "--device: "),
])
def test_bad_input_exits_2(cli_project, capsys, setup, args, message):
    path = cli_project / "in.txt"
    if setup == "empty":
        path.write_bytes(b"")
    elif setup == "ok":
        path.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", "transformer", "--text", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    assert "example: lmpipe eval --model" in capsys.readouterr().out


def test_eval_ngram_matches_the_library(cli_project, tok, capsys):  # noqa: F811
    path = cli_project / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    expected = score_text(cli_project / "data" / "models" / "ngram", TEXT, tokenizer=tok)
    assert main(["eval", "--model", "ngram", "--text", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] == pytest.approx(expected.bpb, rel=1e-9)


def test_eval_warns_that_a_few_bytes_say_little(cli_project, capsys):
    path = cli_project / "tiny.txt"
    path.write_text("Hi\n", encoding="utf-8")
    assert main(["eval", "--model", "transformer", "--text", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["bytes"] == 3 and data["warning"].startswith(f"only {data['tokens']} tokens")
    assert "lmpipe eval: warning: only" in captured.err and "says little" in captured.err
    long = cli_project / "long.txt"
    long.write_text(TEXT * 8, encoding="utf-8")
    assert main(["eval", "--model", "transformer", "--text", str(long), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warning"] is None and "warning" not in captured.err
