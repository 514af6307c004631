"""Chat-template tokenization with the loss on completion tokens only."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label value that carries no loss (PyTorch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels (IGNORE on every prompt token)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it at inference: chat template plus the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, messages: list[dict], answer: str) -> Encoded:
    """Prompt + answer through the chat template; only the answer and its end-of-turn are learned.

    The completion is cut right after the end-of-turn token: the template's trailing newline
    is never generated at inference, so learning it would only cost compute.
    """
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently with an answer appended")
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in c_ids:
        c_ids = c_ids[: c_ids.index(eos) + 1]
    return Encoded(p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids)
