"""Packed documents: the segment ids of rows whose documents each end at a separator token.

One builder for the training packer (train.data, documents="reset") and for decoding a prompt that holds
separators (models.generate), so the two read a row alike: a separator (the tokenizer's eos_id) belongs to the
document it ends, and the position after it starts the next one.
"""

from __future__ import annotations

import numpy as np


def document_ids(inputs: np.ndarray, separator: int) -> np.ndarray:
    """[..., T] input tokens -> [..., T] int32 segment ids: the separators before each position (a separator
    belongs to the document it ends)."""
    inputs = np.asarray(inputs)
    ends = (inputs == separator).astype(np.int32)
    return np.concatenate([np.zeros_like(ends[..., :1]), np.cumsum(ends[..., :-1], axis=-1, dtype=np.int32)],
                          axis=-1)
