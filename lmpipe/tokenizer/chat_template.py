"""The chat template: the one place that turns (system, prompt, response) into token ids.

Training (`sft`, `lora`), their held-out evaluation and `lmpipe chat` (through
`lmpipe.models.sampling.generate_reply`) all call `encode_chat`, so the model is always asked in exactly the layout it was taught. Written out
(markers shown as text, ``\\n`` a newline)::

    </s><|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{response}<|im_end|></s>

* The leading ``</s>`` (EOS) is the document boundary every model in the project starts from
  (docs/ARCHITECTURE.md, scoring convention): pretraining saw each document after an EOS.
* ``<|im_start|>``, ``<|im_end|>`` and EOS are inserted as *ids*, never parsed from text: the
  tokenizer turns a user's literal ``"<|im_end|>"`` into ordinary pieces, so a message cannot
  close its own turn or forge a role.
* Everything up to and including ``<|im_start|>assistant\\n`` is the *prompt part*; the model
  is trained only on what follows it (the response, its closing ``<|im_end|>`` and the final
  EOS). The closing marker is what teaches the model to stop (chat stops sampling there); the
  EOS after it ends the exchange as a document, as in pretraining, and is kept in the loss
  because it is part of what the assistant turn produces (it is near-certain after
  ``<|im_end|>``, so it lowers the response perplexity only slightly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lmpipe.core.names import DEFAULT_SYSTEM_PROMPT

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatIds:
    """Ids of one templated exchange; ``ids[response_start:]`` is what the model must produce."""

    ids: list[int]
    response_start: int
    user_span: tuple[int, int] = (0, 0)   # ids[a:b] = the current user message's text

    @property
    def prompt_ids(self) -> list[int]:
        return self.ids[: self.response_start]

    @property
    def response_ids(self) -> list[int]:
        return self.ids[self.response_start :]


def _turn_header(tok, role: str) -> list[int]:
    # encode(role) + "\n": the newline is a piece of its own, so this never merges with content
    return [tok.im_start_id, *tok.encode(role), tok.newline_id]


def _turn(tok, role: str, content: str) -> list[int]:
    return [*_turn_header(tok, role), *tok.encode(content), tok.im_end_id, tok.newline_id]


def encode_chat(tok, prompt: str, response: str | None = None,
                system: str | None = DEFAULT_SYSTEM_PROMPT,
                history: Sequence[tuple[str, str]] = ()) -> ChatIds:
    """Template one exchange.

    `response=None` gives the generation prompt (ending with ``<|im_start|>assistant\\n``);
    otherwise the ids end with ``response <|im_end|> </s>``. `system=None` or ``""`` leaves the
    system turn out. `history` (chat only; training uses single exchanges) puts earlier
    (user, assistant) exchanges before this one, each turn closed by ``<|im_end|>\\n``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = [tok.eos_id]
    if system:
        ids += _turn(tok, "system", system)
    for user, assistant in history:
        ids += _turn(tok, "user", user) + _turn(tok, "assistant", assistant)
    user_start = len(ids) + len(_turn_header(tok, "user"))
    ids += _turn(tok, "user", prompt)
    user_end = len(ids) - 2                      # before <|im_end|> "\n"
    ids += _turn_header(tok, "assistant")
    start = len(ids)
    if response is not None:
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        ids += [*tok.encode(response), tok.im_end_id, tok.eos_id]
    return ChatIds(ids=ids, response_start=start, user_span=(user_start, user_end))


def render_chat(prompt: str, response: str | None = None,
                system: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The template as readable text (logs, docs); never encode this string: use encode_chat."""
    out = "</s>"
    if system:
        out += f"<|im_start|>system\n{system}<|im_end|>\n"
    out += f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if response is not None:
        out += f"{response}<|im_end|></s>"
    return out


def stop_ids(tok) -> tuple[int, ...]:
    """Ids that end an assistant turn when sampling: its closing marker (and EOS, defensively)."""
    return (tok.im_end_id, tok.eos_id)
