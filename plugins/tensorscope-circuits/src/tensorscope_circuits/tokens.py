"""Tokens named by the user: an id, or a text the model's tokenizer maps to exactly one token."""

from __future__ import annotations

from tensorscope_core.plugin_api import DataError, ModelView


def token_id(view: ModelView, token: int | str, what: str) -> int:
    """The id of ``token`` (``what`` names it in errors): ids must lie in the vocabulary, texts be one token."""
    if isinstance(token, int):
        if not 0 <= token < view.vocab_size:
            raise DataError(f"{what}: token id {token} is outside the vocabulary of {view.name} "
                            f"({view.vocab_size} tokens)", "pass an id in [0, vocab_size)")
        return token
    if view.tokenizer is None:
        raise DataError(f"{what}: the text {token!r} needs a tokenizer and {view.name} has none",
                        "pass the token id instead")
    ids = view.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise DataError(f"{what}: {token!r} is {len(ids)} tokens for the tokenizer of {view.name} ({ids})",
                        "name a single token (a GPT-2-style tokenizer usually wants the leading space: ' Paris')")
    return int(ids[0])
