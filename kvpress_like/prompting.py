"""Turning a context and a question into token ids, with the spans each protocol needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CONTEXT_MARK = "\x00KVPRESS_LIKE_CONTEXT\x00"
_QUESTION_MARK = "\x00KVPRESS_LIKE_QUESTION\x00"
SEPARATOR = "\n\n"
ANSWER_CUE = "\nAnswer:"


@dataclass(frozen=True)
class Prompt:
    """Token ids ``[1, L]`` of one templated prompt.

    ``context_length`` ids hold the template's head, the context and the separator (what the
    query-agnostic protocol compresses); ``question_span`` is the question's own ids.
    """

    input_ids: torch.Tensor
    context_length: int
    question_span: tuple[int, int] | None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def answer_opening(tokenizer, text: str) -> str:
    """``text`` as the first words of the answer, right after the prompt built by :func:`build_prompt`.

    After a chat template's assistant-turn opener the text is used as it is; the plain prompt ends
    with the ``Answer:`` cue, so the words that follow it start with a space.
    """
    return text if not text or has_chat_template(tokenizer) else " " + text


def build_prompt(tokenizer, context: str, question: str | None = None) -> Prompt:
    """Apply the tokenizer's chat template (one user turn) and tokenise each piece separately.

    Pieces are tokenised one by one so that the context's ids are the same in both protocols.
    Without a chat template (a base model) the prompt is plain text:
    ``BOS + context + "\\n\\n" + question + "\\nAnswer:"``, or ``BOS + context`` without a question.
    """
    content = _CONTEXT_MARK if question is None else _CONTEXT_MARK + SEPARATOR + _QUESTION_MARK
    if has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        bos = []
    else:
        rendered = content if question is None else content + ANSWER_CUE
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head, rest = rendered.split(_CONTEXT_MARK)
    if question is None:
        pieces_before_question, tail = [head, context], rest
    else:
        between, tail = rest.split(_QUESTION_MARK)
        pieces_before_question = [head, context, between]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    ids = list(bos)
    for piece in pieces_before_question:
        ids += encode(piece)
    context_length = len(ids)
    span = None
    if question is not None:
        question_ids = encode(question)
        span = (len(ids), len(ids) + len(question_ids))
        ids += question_ids
    ids += encode(tail)
    return Prompt(torch.tensor([ids], dtype=torch.long), context_length, span)
