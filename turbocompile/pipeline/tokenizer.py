"""A tokenizer for the tiny embedded text encoder that needs no vocabulary file and no download.

Words and punctuation marks are hashed (sha256, stable across processes and machines) into a small id
space, so different prompts give different token ids and the same prompt always gives the same ones.
It is a ``transformers`` tokenizer (python backend), so the text-encoder code treats it exactly like
the real ``google/umt5-xxl`` tokenizer. It is meant only for the random ``wan-tiny`` models.
"""
from __future__ import annotations

import hashlib
import re

from transformers import PreTrainedTokenizer

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class HashWordTokenizer(PreTrainedTokenizer):
    """Whitespace/punctuation splitting, then ``sha256(word) mod n`` ids; pad=0, eos=1, unk=2 as in T5."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, hash_vocab_size: int = 4096, **kwargs):
        self.hash_vocab_size = int(hash_vocab_size)
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        self._specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.hash_vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._specials)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return _WORD.findall(text.lower())

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._specials:
            return self._specials[token]
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        return len(self._specials) + int.from_bytes(digest[:8], "little") % (self.hash_vocab_size - len(self._specials))

    def _convert_id_to_token(self, index: int) -> str:
        for tok, i in self._specials.items():
            if i == index:
                return tok
        return f"<h{index}>"

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        ids = token_ids_0 + [self.eos_token_id]
        return ids if token_ids_1 is None else ids + token_ids_1 + [self.eos_token_id]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()
