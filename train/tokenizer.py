"""Tokenizers for the training data: UTF-8 bytes by default, or any Hugging Face `tokenizers` JSON file.

Both expose the same small surface: `vocab_size`, `eos_id` (the document separator packed between documents),
`encode(text) -> np.ndarray[int]` and `decode(ids) -> str`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Separator names tried, in order, when a HF tokenizer's eos_token is not given.
_COMMON_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|eot_id|>")


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes; 256 separates documents. No merges, no unknown tokens."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """text -> [n] uint32 byte values."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint32)

    def decode(self, ids) -> str:
        """[n] ids -> text; separators become newlines, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        out = bytes(int(i) if i < 256 else 10 for i in ids if 0 <= i < self.vocab_size)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (the fast tokenizers' tokenizer.json)."""

    def __init__(self, path: str, eos_token: str = ""):
        from tokenizers import Tokenizer  # imported here, not at start-up: byte-level runs never need it

        if not Path(path).is_file():
            raise ValueError(f"tokenizer: file {path!r} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"tokenizer {path!r} is not a valid tokenizers JSON file: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token else _COMMON_EOS
        ids = [self._tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path!r} has no separator token among {names}; "
                             "set eos_token to one it has")
        self.eos_id = int(found[0])

    def encode(self, text: str) -> np.ndarray:
        """text -> [n] uint32 ids, without special tokens added (packing inserts the separator)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def load_tokenizer(spec: str, eos_token: str = "") -> ByteTokenizer | HFTokenizer:
    """"byte" or a path to a tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)
