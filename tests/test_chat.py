"""`lmpipe chat`: the template, the KV-cached sampler, stopping at <|im_end|>, both modes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lmpipe.cli.main import main
from lmpipe.cli.text_out import display_text
from lmpipe.models.sampling import generate, generate_reply
from lmpipe.models.store import build_model, save_model
from lmpipe.tokenizer.chat_template import encode_chat, stop_ids
from tests.helpers.sft import make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    make_tokenizer(root)
    return root


@pytest.fixture
def root(tok_dir, monkeypatch):
    monkeypatch.setenv("LMPIPE_ROOT", str(tok_dir))
    return tok_dir


def _tok(root):
    from lmpipe.tokenizer.model import Tokenizer

    return Tokenizer.load(root / "data" / "tokenizer" / "tokenizer.model")


def cfg(tok, **over):
    return dict(vocab_size=tok.vocab_size, context_length=64, n_layer=1, n_head=2, d_model=32,
                **over)


def forced_model(tok, token_id: int):
    """A model that always predicts `token_id`: a huge bias on one residual coordinate, read
    by a head row that only `token_id` has."""
    torch.manual_seed(0)
    m = build_model("transformer", cfg(tok, bias=True, tie_embeddings=False))
    with torch.no_grad():
        m.blocks[-1].mlp.proj.bias.zero_()
        m.blocks[-1].mlp.proj.bias[0] = 1e4
        m.head.weight.zero_()
        m.head.weight[token_id, 0] = 1.0
    return m.eval()


def save(root, name, model):
    folder = root / "data" / "models" / name
    if name == "lora":
        folder = folder / "merged"
    save_model(model, folder, "transformer", model.config)
    return folder


def test_one_shot_answer_is_the_templated_kv_cached_sample(root, capsys):
    tok = _tok(root)
    torch.manual_seed(1)
    model = build_model("transformer", cfg(tok)).eval()
    save(root, "sft", model)
    cut_characters = []
    for extra, kw in [(["--temperature", "0"], dict(temperature=0.0, top_p=0.9)),
                      (["--temperature", "1.0", "--top-k", "20", "--top-p", "0.8", "--seed", "4"],
                       dict(temperature=1.0, top_k=20, top_p=0.8, seed=4))]:
        assert main(["chat", "--model", "sft", "--prompt", "Shout: apple",
                     "--max-new-tokens", "12", "--repetition-penalty", "1.0", *extra]) == 0
        out = capsys.readouterr().out
        new = generate(model, encode_chat(tok, "Shout: apple").ids, 12, use_cache=True,
                       stop_ids=stop_ids(tok), **kw)
        # the text of those ids, with the bytes of cut characters held back, never U+FFFD
        # (this random model emits byte pieces in any order; tok.decode shows them as U+FFFD)
        assert out == display_text(tok, new)[0] + "\n" and "\ufffd" not in out
        cut_characters.append("\ufffd" in tok.decode(new))
    assert any(cut_characters)      # the case that printed U+FFFD before was exercised


def test_system_line_follows_the_model_unless_given(root, capsys):
    from lmpipe.core.names import DEFAULT_SYSTEM_PROMPT

    tok = _tok(root)
    torch.manual_seed(2)
    model = build_model("transformer", cfg(tok)).eval()
    with torch.no_grad():          # large weights: the greedy answer depends on the context
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5)
    folder = root / "data" / "models" / "sft"
    outs = set()
    for recorded, flag, used in [(None, [], None), ("Be brief.", [], "Be brief."),
                                 ("Be brief.", ["--system", ""], None),
                                 ("Be brief.", ["--system", "Hi."], "Hi.")]:
        save_model(model, folder, "transformer", model.config, extra={"system_prompt": recorded})
        # no repetition penalty on either side: the comparison is about the system line
        assert main(["chat", "--model", "sft", "--prompt", "Shout: apple", "--temperature", "0",
                     "--max-new-tokens", "6", "--repetition-penalty", "1.0", *flag]) == 0
        new = generate(model, encode_chat(tok, "Shout: apple", system=used).ids, 6,
                       temperature=0.0, stop_ids=stop_ids(tok))
        assert capsys.readouterr().out == display_text(tok, new)[0] + "\n"
        outs.add(tuple(new))
    assert len(outs) > 1                                         # the system line matters
    save_model(model, folder, "transformer", model.config)      # nothing recorded: the default
    assert main(["chat", "--model", "sft", "--prompt", "Shout: apple", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    new = generate(model, encode_chat(tok, "Shout: apple", system=DEFAULT_SYSTEM_PROMPT).ids, 6,
                   temperature=0.0, stop_ids=stop_ids(tok))
    assert capsys.readouterr().out == display_text(tok, new)[0] + "\n"


def test_stops_at_im_end_and_lora_uses_the_merged_model(root, capsys):
    tok = _tok(root)
    save(root, "lora", forced_model(tok, tok.im_end_id))
    assert main(["chat", "--model", "lora", "--prompt", "hi", "--max-new-tokens", "9"]) == 0
    assert capsys.readouterr().out == "\n"                     # <|im_end|> first: empty answer
    letter = tok.encode("Z")[0]
    save(root, "sft", forced_model(tok, letter))
    assert main(["chat", "--model", "sft", "--prompt", "hi", "--max-new-tokens", "9"]) == 0
    assert capsys.readouterr().out == tok.decode([letter] * 9) + "\n"


SEED = 0


def context_model(tok, seed: int = SEED):
    """A real (untrained) model with large weights, so that its greedy answer depends on the
    whole prompt and earlier exchanges in it show in the reply; its output head is cut down to
    the purely alphabetic pieces, so that what it says reads cleanly on a terminal."""
    torch.manual_seed(seed)
    model = build_model("transformer", cfg(tok, tie_embeddings=False)).eval()
    words = [i for i in range(tok.vocab_size) if tok.decode([i]).strip().isalpha()
             and tok.decode([i]).isascii()]
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5)
        keep = torch.zeros(tok.vocab_size, dtype=torch.bool)
        keep[words] = True
        model.head.weight[~keep] = 0.0
    return model


def replies(model, tok, prompts, history: bool) -> list[str]:
    """What the chat loop must answer, computed with the library: each prompt after the
    exchanges before it (with --history) or alone."""
    out, past = [], []
    for prompt in prompts:
        reply = generate_reply(model, tok, prompt, history=past if history else (),
                               max_new_tokens=6, temperature=0.0, repetition_penalty=1.0)
        out.append(reply)
        past.append((prompt, reply))
    return out


CHAT_ARGS = ["chat", "--model", "sft", "--temperature", "0", "--max-new-tokens", "6",
             "--repetition-penalty", "1.0"]


def history_case(root):
    """An sft model whose answer to the second prompt changes with the first in its history:
    (first, second, the two replies with history, the second reply alone)."""
    tok = _tok(root)
    model = context_model(tok)
    save(root, "sft", model)
    first, second = "Shout: apple", "Shout: river"
    with_history = replies(model, tok, [first, second], history=True)
    alone = replies(model, tok, [second], history=False)[0]
    return first, second, with_history, alone


def test_piped_prompts_history_and_reset(root, capsys, monkeypatch):
    """Not a terminal: one reply per line, no prompts; /reset forgets, /quit ends."""
    first, second, with_history, alone = history_case(root)
    assert with_history[1] != alone          # the history changes this answer: it is observable
    monkeypatch.setattr("sys.stdin", io.StringIO(
        f"{first}\n\n{second}\n/reset\n{second}\n/quit\nnever answered\n"))
    assert main([*CHAT_ARGS, "--history"]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [with_history[0], with_history[1], alone]
    assert cap.err.count("(conversation forgotten)") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n{second}\n"))
    assert main(CHAT_ARGS) == 0                # without --history every prompt stands alone
    assert capsys.readouterr().out.splitlines() == [with_history[0], alone]


def _read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    import os
    import select
    import time

    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout:.0f} s; got {data[-2000:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:        # the other side closed (EIO)
            chunk = b""
        if not chunk:
            raise AssertionError(f"the chat ended before {marker!r}; got {data[-2000:]!r}")
        data += chunk
    return data


@pytest.mark.timeout(300)
def test_terminal_session_prompts_history_reset_and_quit(root):
    """The interactive branch, driven through a pseudo-terminal like a person at a keyboard:
    the banner, a `you> ` prompt per turn, `assistant> ` replies that carry the history,
    /reset forgetting it, /quit leaving with exit 0."""
    import os
    import pty
    import re
    import subprocess
    import sys

    first, second, with_history, alone = history_case(root)
    assert with_history[1] != alone
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LMPIPE_ROOT": str(root), "PYTHONPATH": str(repo), "TERM": "dumb"}
    master, slave = pty.openpty()        # stdin, stdout and stderr: the terminal, as for a person
    proc = subprocess.Popen([sys.executable, "-m", "lmpipe.cli", *CHAT_ARGS, "--history"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=root, env=env)
    os.close(slave)
    try:
        screen = [_read_until(master, b"you> ").decode("utf-8", "replace")]
        for line in (first, second, "/reset", second):
            os.write(master, line.encode() + b"\n")
            screen.append(_read_until(master, b"you> ").decode("utf-8", "replace"))
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert screen[0].startswith("lmpipe chat (sft, ")
    assert "/reset forgets the conversation" in screen[0]
    said = [re.findall(r"assistant> (.*?)\r\n", turn) for turn in screen[1:]]
    assert said == [[with_history[0]], [with_history[1]], [], [alone]]
    assert "(conversation forgotten)" in screen[3]
    assert "(conversation forgotten)" not in "".join(screen[:3] + screen[4:])


def test_history_is_trimmed_to_fit_the_context(root):
    tok = _tok(root)
    model = forced_model(tok, tok.encode("Z")[0])
    history = [("Shout: apple river stone", "APPLE RIVER STONE!")] * 5
    full = len(encode_chat(tok, "hi", history=history).ids)
    assert full > 64
    reply = generate_reply(model, tok, "hi", history=history, max_new_tokens=5, temperature=0)
    assert reply == tok.decode([tok.encode("Z")[0]] * 5)   # no overflow error: history trimmed


def test_bad_arguments_exit_2(root, capsys, tmp_path, monkeypatch):
    assert main(["chat", "--model", "rnn", "--prompt", "x"]) == 2
    assert "--model: unknown model 'rnn'" in capsys.readouterr().err
    assert main(["chat", "--model", "sft", "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err
    monkeypatch.setenv("LMPIPE_ROOT", str(tmp_path))
    assert main(["chat", "--model", "lora", "--prompt", "x"]) == 2
    assert "run `dvc repro lora` first" in capsys.readouterr().err
