"""Chat and prompt/completion examples: token ids plus a loss mask, packed whole into training sequences.

**Rendering.** A chat record's ``messages`` are rendered with a chat template (the student tokenizer's, or
``[data] chat_template``) and tokenised without adding special tokens (the template writes them). A
prompt/completion record of strings is ``prompt`` then ``completion`` then the EOS token, tokenised apart (so
no token spans the boundary); of message lists, it is the conversation ``prompt + completion`` rendered like
chat.

**Loss mask** (``[data] loss_on = "completion"``): 1 on the tokens of the assistant turns (chat) or of the
completion, 0 elsewhere; ``"all"``: 1 everywhere. An assistant turn's span is found by rendering the
conversation up to the turn (with the generation prompt) and up to its end: the characters in between are
the turn's (its content and the template's end-of-turn text, e.g. ``<|im_end|>``). A template that does not
render a conversation's prefixes as prefixes of the whole (one that rewrites earlier turns) falls back to the
turn's content alone. A token is in the span when its first character is.

**Packing.** An example is never split over two sequences. Examples are packed in file order into blocks of
exactly ``seq_len - 1`` tokens (the next one starts a new block when it does not fit; the rest of a block is
padding with mask 0), and every block is one document of the shard: the sampler's stream (each document
followed by the separator) then puts block k at stream position ``k * seq_len``, i.e. sequence k is exactly
block k plus its separator. The separator's label and the first token of every block have mask 0 (the
label crossing into the next block is never counted). An example longer than ``seq_len - 1`` tokens is cut
to its first ``seq_len - 1`` (``[data] long_examples = "truncate"``; dropped when no masked-in token is left)
or left out (``"drop"``), counted per file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

Example = tuple[list[int], list[int]]  # token ids, loss mask


def _render(tokenizer, messages, template, generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def _spans(
    tokenizer, messages: list[dict], trained: list[int], template
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the turns ``trained`` (module doc)."""
    full = _render(tokenizer, messages, template)
    spans, cursor = [], 0
    for k in trained:
        before = _render(tokenizer, messages[:k], template, generation_prompt=True)
        upto = _render(tokenizer, messages[: k + 1], template)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            spans.append((len(before), len(upto)))
            cursor = len(upto)
            continue
        content = messages[k]["content"]
        at = full.find(content, cursor)
        if at >= 0 and content:
            spans.append((at, at + len(content)))
            cursor = at + len(content)
    return full, spans


def _mask_from_offsets(offsets, spans: list[tuple[int, int]]) -> list[int]:
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.int8)
    for a, b in spans:
        mask |= ((starts >= a) & (starts < b)).astype(np.int8)
    return mask.tolist()


class ExampleEncoder:
    """Turns chat / prompt-completion records into :data:`Example` s (module doc), a batch at a time."""

    def __init__(self, tokenizer, template: str | None, loss_on: str, domain: int, name: str):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ConfigError(
                f"data.domains[{domain}].format", "chat", "a Hugging Face tokenizer for chat records"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.loss_on = loss_on
        self.eos = tokenizer.eos_token_id
        self.domain, self.name = domain, name

    def _check_template(self) -> None:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "data.chat_template",
                "",
                "a chat-template file (a Jinja template) or a student tokenizer that has a chat template",
                f"domain {self.name!r} has chat records and the tokenizer has no chat_template",
            )

    def encode(self, fmt: str, values: list) -> list[Example]:
        if fmt == "prompt_completion" and values and isinstance(values[0][0], str):
            return self._prompt_completion(values)
        self._check_template()
        rendered = []
        for v in values:
            if fmt == "chat":
                msgs, trained = v, [k for k, m in enumerate(v) if m["role"] == "assistant"]
            else:  # conversational prompt / completion: the completion's turns are trained
                msgs, trained = v[0] + v[1], list(range(len(v[0]), len(v[0]) + len(v[1])))
            rendered.append(_spans(self.tokenizer, msgs, trained, self.template))
        enc = self.tokenizer(
            [full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
            return_attention_mask=False,
        )  # fmt: skip
        out = []
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
            mask = [1] * len(ids) if self.loss_on == "all" else _mask_from_offsets(offsets, spans)
            out.append((list(ids), mask))
        return out

    def _prompt_completion(self, values: list) -> list[Example]:
        tok = self.tokenizer
        prompts = tok([p for p, _ in values], add_special_tokens=False, return_attention_mask=False)
        completions = tok([c for _, c in values], add_special_tokens=False, return_attention_mask=False)
        keep_prompt = 1 if self.loss_on == "all" else 0
        out = []
        for p, c in zip(prompts["input_ids"], completions["input_ids"]):
            out.append((list(p) + list(c) + [self.eos], [keep_prompt] * len(p) + [1] * (len(c) + 1)))
        return out


class BlockPacker:
    """Packs examples whole into blocks of ``block_len`` tokens (module doc); ``emit(ids, mask)`` gets each
    full block as int64 / uint8 arrays."""

    def __init__(
        self, block_len: int, pad_id: int, policy: str, emit: Callable[[np.ndarray, np.ndarray], None]
    ):
        if block_len < 1:
            raise ConfigError("data.seq_len", block_len + 1, "at least 2 for chat or prompt_completion data")
        self.block_len, self.pad_id, self.policy, self.emit = block_len, pad_id, policy, emit
        self._ids: list[int] = []
        self._mask: list[int] = []
        self.blocks = 0
        self.padding = 0  # padding tokens written (the cost of never splitting an example)

    def add(self, ids: list[int], mask: list[int], faults) -> bool:
        """Add one example; False when it was left out (too long, or no counted token: counted in
        ``faults``)."""
        if len(ids) > self.block_len:
            if self.policy == "drop":
                faults.dropped_long += 1
                return False
            ids, mask = ids[: self.block_len], mask[: self.block_len]
            if not any(mask):
                faults.dropped_long += 1
                return False
            faults.truncated += 1
        if len(self._ids) + len(ids) > self.block_len:
            self.flush()
        self._ids.extend(ids)
        self._mask.extend(mask)
        return True

    def flush(self) -> None:
        if not self._ids:
            return
        n_pad = self.block_len - len(self._ids)
        ids = np.asarray(self._ids + [self.pad_id] * n_pad, dtype=np.int64)
        mask = np.asarray(self._mask + [0] * n_pad, dtype=np.uint8)
        mask[0] = 0  # its label would be predicted from the previous block's separator
        self.emit(ids, mask)
        self.blocks += 1
        self.padding += n_pad
        self._ids, self._mask = [], []
