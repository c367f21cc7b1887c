"""Output worth reading (issue 16): progress lines off a terminal, DVC's advice once, no
U+FFFD for a cut character, help examples that print text, a loss-curve figure that keeps
corpus and instruction losses apart, and a results table generated from a run's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe.cli.main import main
from lmpipe.cli.text_out import Utf8Holder, clean_continuation, display_text
from lmpipe.core.console import ProgressLines
from lmpipe.evaluation.model_card import BEGIN, END, describe_model, replace_block
from tests.conftest import REPO


# ----------------------------------------------------------------------------- progress
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_lines_come_at_most_every_few_seconds_with_step_loss_rate_and_eta(capsys):
    clock = FakeClock()
    bar = ProgressLines(total=100, desc="pretrain", clock=clock)
    printed_at = []
    for step in range(100):
        clock.t += 0.5                      # a step every half second: 50 s in all
        bar.set_postfix({"loss": f"{5 - step / 50:.3f}", "tok/s": "8,000"})
        before = capsys.readouterr().err
        bar.update(1)
        if capsys.readouterr().err:
            printed_at.append(clock.t)
        assert not before
    gaps = [b - a for a, b in zip([0.0] + printed_at, printed_at)]
    assert 5 <= len(printed_at) <= 8 and max(gaps) <= 10, printed_at
    line = ProgressLines(total=100, desc="pretrain", clock=clock)
    clock.t += 10
    line.set_postfix({"loss": "3.210", "tok/s": "8,000"})
    line.update(25)
    err = capsys.readouterr().err.strip()
    assert err == "pretrain: step 25/100 (25%) loss 3.210 tok/s 8,000 ETA 0:30"


def test_a_training_stage_off_a_terminal_prints_progress_lines(tmp_path):
    from tests.helpers.trainer import make_project, run_stage

    root = make_project(tmp_path, {"pretrain": {"train": {"max_steps": 6, "eval_every": 3,
                                                          "checkpoint_every": 3, "threads": 1}}})
    proc = run_stage("pretrain", root)      # stderr is a pipe, as under `lmpipe run`
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: step ")]
    assert lines and lines[-1].startswith("pretrain: step 6/6 (100%) loss "), proc.stderr
    assert " tok/s " in lines[-1] and " ETA " in lines[-1]
    assert "\r" not in proc.stderr         # no progress bar redraws in a log


def test_the_flow_shows_dvc_advice_once_not_per_stage(tmp_path):
    """`dvc repro` ends with `git add dvc.lock ...` advice; the flow's echo leaves it out."""
    from pipeline.flow import run_dvc_repro

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env={**__import__("os").environ, **env})
    (tmp_path / "dvc.yaml").write_text("stages:\n  one:\n    cmd: echo hi > out.txt\n"
                                       "    outs:\n      - out.txt\n")
    echoed: list[str] = []
    result = run_dvc_repro("one", tmp_path, echo=echoed.append, log_dir=tmp_path / "logs")
    log = Path(result["log"]).read_text()
    assert "git add" in log                                   # DVC said it ...
    assert not [e for e in echoed if "git add" in e or "autostage" in e], echoed  # ... once, later
    assert any("Running stage 'one'" in e for e in echoed)


def test_a_params_error_makes_lmpipe_run_exit_2_like_the_stage():
    from lmpipe.cli.run import EXIT_BAD_INPUT
    from pipeline.flow import PipelineFailed, StageFailed

    typo = str(StageFailed("params", 2, 255, "ngram.orderr: unknown key", "params.log"))
    crash = str(StageFailed("pretrain", 1, 255, "Traceback ...", "pretrain.log"))
    assert PipelineFailed({"params": typo}, ["download"]).bad_input
    assert not PipelineFailed({"params": typo, "pretrain": crash}, []).bad_input
    assert EXIT_BAD_INPUT == 2


# ----------------------------------------------------------------------------- text
E_ACUTE = "é".encode()          # two bytes: c3 a9
DASH = "—".encode()             # three bytes: e2 80 94


def test_utf8_holder_holds_a_cut_character_until_it_completes():
    h = Utf8Holder()
    assert h.feed(b"caf") == "caf"
    assert h.feed(E_ACUTE[:1]) == ""            # held, not U+FFFD
    assert h.feed(E_ACUTE[1:] + DASH[:2]) == "é"
    assert h.feed(DASH[2:] + b"!") == "—!"
    assert h.finish() == "" and h.dropped == 0


def test_utf8_holder_drops_bytes_that_never_form_a_character():
    h = Utf8Holder()
    text = h.feed(b"a" + DASH[:2] + b"b") + h.feed(DASH[:1]) + h.finish()
    assert text == "ab" and "\ufffd" not in text
    assert h.dropped == 3


class ByteTokenizer:
    """The tokenizer's interface for byte-fallback pieces (ids 7..262 are bytes 0..255)."""

    def is_special(self, i):
        return i < 3

    def is_byte(self, i):
        return 7 <= i < 263

    def id_to_piece(self, i):
        return f"<0x{i - 7:02X}>" if self.is_byte(i) else {300: "\u2581Hi", 301: "!"}[i]


def test_display_text_of_generated_ids_never_prints_a_replacement_character():
    tok = ByteTokenizer()
    ids = [300] + [7 + b for b in DASH] + [301] + [7 + DASH[0], 7 + DASH[1]]   # cut at the end
    text, dropped = display_text(tok, ids + [2])                               # EOS skipped
    assert text == " Hi—!" and dropped == 2


def test_generate_leaves_out_replacement_characters_of_the_continuation_only():
    text, n = clean_continuation("a\ufffd prompt and more\ufffd\ufffd", "a\ufffd prompt")
    assert text == "a\ufffd prompt and more" and n == 2


@pytest.mark.parametrize("verb,example", [
    ("chat", 'lmpipe chat --model sft --prompt "Give three tips for staying healthy." --temperature 0'),
    ("generate", 'lmpipe generate --model transformer --prompt "ROMEO:"'),
    ("compare", "lmpipe compare baseline order5"),
])
def test_help_examples_print_text(capsys, verb, example):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert example in out
    assert all(len(line) <= 120 and not line.endswith(" ") for line in out.splitlines()), out
    if verb != "compare":
        assert "small and quickly trained" in " ".join(out.split())


# ----------------------------------------------------------------------------- figures
def test_loss_curve_figure_keeps_corpus_and_instruction_losses_apart(tmp_path, monkeypatch):
    from lmpipe.evaluation import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    rows = [{"step": s, "tokens": 100 * s, "train_loss": 5 - s / 10, "val_loss": 5 - s / 9}
            for s in range(1, 11)]
    plots.plot_loss_curves({m: rows for m in ("rnn", "transformer", "sft", "lora")},
                           tmp_path / "loss_curves.png")
    (fig,) = figures
    corpus, instruct = fig.axes
    assert "corpus" in corpus.get_title() and "instruction" in instruct.get_title()
    assert {line.get_label().split()[0] for line in corpus.lines} == {"rnn", "transformer"}
    assert {line.get_label().split()[0] for line in instruct.lines} == {"sft", "lora"}
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- results
def write_run(root: Path) -> None:
    m = root / "metrics"
    m.mkdir(parents=True)
    files = {
        "download": {"train_bytes": 1003854},
        "ngram": {"ngrams_order_1": 1000, "ngrams_order_2": 9000, "train_seconds": 0.2,
                  "val_bpb": 2.0721, "test_bpb": 2.3393},
        "rnn": {"params": 1180000, "train_seconds": 100.0, "val_bpb": 2.1019},
        "pretrain": {"params": 3480000, "train_seconds": 301.0, "val_bpb": 2.0492},
        "sft": {"params": 3480000, "train_seconds": 45.0, "train_examples": 190,
                "val_response_ppl": 99.2, "base_val_response_ppl": 1018.4},
        "lora": {"params": 3480000, "train_seconds": 50.0, "train_examples": 190,
                 "val_response_ppl": 152.0, "base_val_response_ppl": 1018.4,
                 "trainable_pct": 1.4},
        "evaluate": {"ngram": {"val_bpb": 2.0724, "test_bpb": 2.3393},
                     "rnn": {"val_bpb": 2.0507, "test_bpb": 2.2961},
                     "transformer": {"val_bpb": 1.9107, "test_bpb": 2.2962}},
    }
    for stage, data in files.items():
        (m / f"{stage}.json").write_text(json.dumps(data))


def test_results_table_is_generated_from_the_metrics_and_names_machine_and_commit(project, capsys):
    write_run(project)
    assert main(["results"]) == 0
    out = capsys.readouterr().out
    # val and test both from evaluate, scored the same way (not the stages' own val figures)
    assert "| n-gram (Kneser-Ney) | 10,000 n-grams | 0.2 s | 2.072 | 2.339 |" in out
    assert "| RNN | 1.18 M | 1.7 minutes | 2.051 | 2.296 |" in out
    assert "| Transformer | 3.48 M | 5.0 minutes | 1.911 | 2.296 |" in out
    assert ("Transformer < RNN < n-gram: holds on val (RNN 0.990x, Transformer 0.922x the "
            "n-gram); does not hold on test (RNN 0.982x, Transformer 0.982x the n-gram).") in out
    assert "base Transformer 1,018, SFT 99, LoRA 152" in out
    assert "cores, no GPU used; lmpipe commit " in out and "dvc.lock md5" in out
    readme = project / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    assert main(["results", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "| RNN | 1.18 M |" in text and text.endswith("after\n")
    assert replace_block(text, "new\n", "x").count("new") == 1


def test_the_readme_results_table_is_the_generated_one():
    text = (REPO / "README.md").read_text()
    block = text[text.index(BEGIN):text.index(END)]
    assert "| model | parameters | train time | val bits/byte | test bits/byte |" in block
    assert "Produced by `lmpipe results`" in block and "lmpipe commit " in block


def test_models_are_described_plainly(project):
    write_run(project)
    sft = describe_model("sft", project)
    assert sft.startswith("sft: a 3.5 M-parameter Transformer, pretrained for 5.0 minutes on "
                          "1,003,854 bytes of text, then all weights finetuned for 45 s on 190 "
                          "instruction examples.")
    assert "small demonstration model" in sft
    assert "1.4% of the weights" in describe_model("lora", project)
    assert describe_model("ngram", project).startswith(
        "ngram: an order-2 Kneser-Ney n-gram model (10,000 n-grams)")
