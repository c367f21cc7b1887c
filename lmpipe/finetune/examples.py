"""Instruction examples for `sft` and `lora`: rows -> templated, masked examples.

Loss mask
---------
An example is the ids of `lmpipe.tokenizer.chat_template.encode_chat(tok, prompt, response)`. The model
reads ``ids[:-1]`` and predicts ``ids[1:]``; a target is kept only when it belongs to the
*response part* (the response tokens, the closing ``<|im_end|>`` and the final EOS). Targets in
the prompt part (EOS boundary, system and user turns, the assistant header) and padding are
-100, which `lm_loss` ignores. The loss of a batch is the mean over its kept targets.

Truncation rule (counted in the metrics)
----------------------------------------
An example may hold at most ``max_len = min(max_seq_len, context_length + 1)`` ids (the model
reads all but the last). Let ``need = min(min_response_tokens, response length)``. A longer
example is

* **truncated** (``overflow: truncate``, the default) when its prompt part plus ``need``
  response tokens fit: the end of the response is cut off, closing marker included (such an
  example teaches the answer's start but not where it stops);
* else, with ``truncate_prompt: true``, **prompt-truncated** when the template without the
  user's text plus ``need`` fits: the end of the user's text is cut by just enough, then the
  response as above (for tiny smoke-test contexts; the question may lose its end);
* **dropped** otherwise, and always with ``overflow: drop``.

The counts (``*_examples``, ``*_truncated`` (any cut), ``*_prompt_truncated``, ``*_dropped``,
``*_response_tokens``) go to the stage's metrics for both splits. The held-out split follows
the same rule, so the base and the finetuned model are scored on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from lmpipe.core.names import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX
from lmpipe.tokenizer.chat_template import encode_chat


@dataclass
class Example:
    """One templated exchange: `ids` and the index where the response part starts."""

    ids: list[int]
    response_start: int
    truncated: bool = False

    @property
    def n_response_tokens(self) -> int:
        """Targets that count in the loss."""
        return len(self.ids) - self.response_start


@dataclass
class ExampleSet:
    examples: list[Example]
    rows: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    dropped: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    @property
    def response_tokens(self) -> int:
        return sum(e.n_response_tokens for e in self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    def counts(self, split: str) -> dict[str, int]:
        """Metrics for this split: rows read, examples kept, truncated, dropped, tokens."""
        return {
            f"{split}_rows": self.rows,
            f"{split}_examples": len(self.examples),
            f"{split}_truncated": self.truncated,
            f"{split}_prompt_truncated": self.prompt_truncated,
            f"{split}_dropped": self.dropped,
            f"{split}_tokens": self.tokens,
            f"{split}_response_tokens": self.response_tokens,
        }


def build_examples(tok, rows: Sequence[tuple[str, str]], max_len: int,
                   system: str | None = DEFAULT_SYSTEM_PROMPT, overflow: str = "truncate",
                   min_response_tokens: int = 1, truncate_prompt: bool = False) -> ExampleSet:
    """Template every row and apply the truncation rule of the module docstring."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    out = ExampleSet(examples=[], rows=len(rows))
    for i, (prompt, response) in enumerate(rows):
        chat = encode_chat(tok, prompt, response, system=system)
        ids, start = chat.ids, chat.response_start
        need = min(min_response_tokens, len(ids) - start)
        if len(ids) <= max_len:
            out.examples.append(Example(ids, start))
            continue
        if overflow == "truncate" and truncate_prompt and start + need > max_len:
            a, b = chat.user_span
            cut = start + need - max_len               # user tokens to remove
            if cut <= b - a:
                ids, start = ids[: b - cut] + ids[b:], start - cut
                out.prompt_truncated += 1
        if overflow == "truncate" and start + need <= max_len:
            out.examples.append(Example(ids[:max_len], start, truncated=True))
            out.truncated += 1
        else:
            out.dropped += 1
            out.dropped_rows.append(i)
    return out


def example_max_len(max_seq_len: int, context_length: int) -> int:
    """Ids an example may hold: the model reads all but the last, within its context."""
    return min(max_seq_len, context_length + 1)


def inputs_and_targets(ex: Example) -> tuple[list[int], list[int]]:
    """Model input ids[:-1] and targets ids[1:], prompt-part targets set to -100."""
    ids = ex.ids
    targets = [t if j + 1 >= ex.response_start else IGNORE_INDEX for j, t in enumerate(ids[1:])]
    return ids[:-1], targets
