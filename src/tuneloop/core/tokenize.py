"""Chat-template tokenization with the loss on completion tokens only."""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE = -100  # label value that carries no loss (PyTorch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels (IGNORE on every prompt token)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The chat template's tokens for `messages`, with every message's content tokenized as
    text: a control-token string typed inside it (`<|im_end|>`, `<|im_start|>system`) stays
    ordinary text, while the template's own markers are control tokens. For clean text the
    ids are those of tokenizing the rendered text whole (a turn's content sits between a
    newline or a special token and a special token, where the tokenizer splits anyway)."""
    # Each content is rendered as a marker the template passes through untouched (its index
    # between two private-use code points that occur in no content of the call): the text
    # between markers is the template's own, the text they stand for the user's.
    contents = "".join(str(m.get("content") or "") for m in messages)
    mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in contents)
    pattern = re.compile(f"{mark}(\\d+){mark}")
    marked = [{**m, "content": f"{mark}{i}{mark}"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    found = [int(m.group(1)) for m in pattern.finditer(text)]
    if sorted(found) != list(range(len(messages))):
        raise ValueError("the chat template does not render each message's content once as "
                         "given; its prompt cannot be tokenized safely")
    ids, at = [], 0
    for match in pattern.finditer(text):
        ids += tokenizer(text[at:match.start()], add_special_tokens=False)["input_ids"]
        content = str(messages[int(match.group(1))].get("content") or "")
        ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = match.end()
    return ids + tokenizer(text[at:], add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it at inference: chat template plus the assistant header."""
    return render_ids(tokenizer, messages, add_generation_prompt=True)


def encode(tokenizer, messages: list[dict], answer: str) -> Encoded:
    """Prompt + answer through the chat template; only the answer and its end-of-turn are learned.

    The completion is cut right after the end-of-turn token: the template's trailing newline
    is never generated at inference, so learning it would only cost compute.
    """
    p_ids = prompt_ids(tokenizer, messages)
    full = render_ids(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    if full[:len(p_ids)] != p_ids:
        raise ValueError("the chat template renders the prompt differently with an answer appended")
    c_ids = full[len(p_ids):]
    eos = tokenizer.eos_token_id
    if eos in c_ids:
        c_ids = c_ids[: c_ids.index(eos) + 1]
    return Encoded(p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids)
