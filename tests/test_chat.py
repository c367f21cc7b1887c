"""`lmpipe chat`: the template, the KV-cached sampler, stopping at <|im_end|>, both modes."""

from __future__ import annotations

import io

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
        assert main(["chat", "--model", "sft", "--prompt", "Shout: apple", "--temperature", "0",
                     "--max-new-tokens", "6", *flag]) == 0
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


def test_interactive_mode_reads_prompts_until_quit(root, capsys, monkeypatch):
    tok = _tok(root)
    letter = tok.encode("Q")[0]
    save(root, "sft", forced_model(tok, letter))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\nagain\n/quit\nnever\n"))
    assert main(["chat", "--model", "sft", "--max-new-tokens", "3", "--history"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [tok.decode([letter] * 3)] * 2


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
