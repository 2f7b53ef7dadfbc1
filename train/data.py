"""Training data: files -> one token stream -> packed fixed-length windows -> shuffled global batches (Grain).

- Sources: .txt (a file is a document), .jsonl (each line's text field is a document), or pre-tokenized .bin
  (raw uint16/uint32 ids, memory-mapped and read lazily). "stdlib" stands for the .py files of the running
  interpreter's standard library: real text on every machine.
- Packing: documents are concatenated with the tokenizer's separator after each one, and the stream is cut
  into windows of seq_len + 1 tokens with stride seq_len (inputs = window[:-1], targets = window[1:]), so every
  token is a target exactly once per epoch and windows cross document boundaries at separators.
- Documents: given the separator id, each batch also carries `segment_ids` [B, T] int32, the number of
  separators among the row's inputs before each position. A document ends at its separator, which stays a
  target (predicted at the document's last token) and an input of the document it ends; the next position
  starts the next document. The ids are counted over the whole row, so every host's columns agree.
- Split: every round(1 / val_fraction)-th window is held out for validation (spread over the whole corpus, so
  both splits see the same mix of documents; neighbouring windows share only their boundary token).
- Order: a Grain index pipeline (range -> shuffle(seed) -> repeat, reshuffled each epoch -> batch) defines the
  same global batches for any number of hosts; each host then loads only the rows and columns of those batches
  that its devices hold (`HostSlice`), so the global batch is identical to a one-process run's.
- Resume: the iterator is a Grain DatasetIterator whose get_state/set_state (saved by orbax through
  grain.checkpoint) restarts it at the exact next batch.
"""

from __future__ import annotations

import glob
import json
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from models.documents import document_ids

TEXT_SUFFIXES = (".txt", ".jsonl")
BIN_SUFFIX = ".bin"


@dataclass(frozen=True)
class HostSlice:
    """The part of each global batch [B, T] that this host loads: rows (sequences) and columns (positions)."""

    rows: slice
    cols: slice


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py sources, minus tests and site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def resolve_files(specs) -> list[Path]:
    """Files, directories (searched recursively for .txt/.jsonl/.bin) or globs -> a sorted list of files.

    Raises ValueError for a path that does not exist, a glob that matches nothing, an unknown suffix, or a
    mix of text and .bin files.
    """
    files: list[Path] = []
    for spec in specs:
        if spec == "stdlib":
            files += stdlib_files()
            continue
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            if not matches:
                raise ValueError(f"data: the glob {spec!r} matches no files")
            files += [m for m in matches if m.is_file()]
            continue
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"data: path {spec!r} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, BIN_SUFFIX) and p.is_file())
            if not found:
                raise ValueError(f"data: directory {spec!r} holds no .txt, .jsonl or .bin files")
            files += found
        else:
            files.append(path)
    for f in files:
        if f.suffix not in (*TEXT_SUFFIXES, BIN_SUFFIX, ".py"):
            raise ValueError(f"data: {str(f)!r} has an unknown suffix; use .txt, .jsonl or .bin")
    kinds = {f.suffix == BIN_SUFFIX for f in files}
    if len(kinds) > 1:
        raise ValueError("data: mixes pre-tokenized .bin files with text files; use one kind per run")
    return files


# A text file with more undecodable bytes than this (as a fraction of its characters) is most likely binary.
MAX_UNDECODABLE = 0.01


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (undecodable bytes replaced by U+FFFD); warns if it does not look like text."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad > MAX_UNDECODABLE * max(len(text), 1):
        warnings.warn(f"data: {str(path)!r} does not look like UTF-8 text ({bad} of its {len(text)} characters "
                      "are undecodable bytes); it is trained on as replacement characters. Pre-tokenized ids "
                      "belong in a .bin file", stacklevel=2)
    return text


def _documents(files, text_field: str, max_bytes: int):
    """Yields the text documents of .txt/.py/.jsonl files, stopping before max_bytes (if > 0) is passed."""
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                docs = []
                for n, raw in enumerate(fh, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"data: {f}:{n} is not UTF-8 text ({e.reason} at byte {e.start} of the "
                                         "line); is it a binary file?") from None
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"data: {f}:{n} is not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"data: {f}:{n} has no string field {text_field!r} (set text_field)")
                    docs.append(record[text_field])
        else:
            docs = [_read_text(Path(f))]
        for doc in docs:
            total += len(doc)
            if max_bytes and total > max_bytes:
                return
            yield doc


class TokenStream:
    """The concatenation of token arrays (in memory or memory-mapped) read by [start, stop) ranges."""

    def __init__(self, parts: list[np.ndarray]):
        self._parts = [p for p in parts if len(p)]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32, copied out of whichever parts hold them."""
        out = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            part, base = self._parts[i], int(self._starts[i])
            take = min(stop, base + len(part)) - start
            out.append(np.asarray(part[start - base:start - base + take]))
            start += take
            i += 1
        return np.concatenate(out).astype(np.int32)


def token_stream(files, tokenizer, *, text_field="text", bin_dtype="uint16", max_bytes=0) -> TokenStream:
    """All documents tokenized and separated by tokenizer.eos_id, or the .bin files memory-mapped in order."""
    if files and files[0].suffix == BIN_SUFFIX:
        return TokenStream([np.memmap(f, dtype=np.dtype(bin_dtype), mode="r") for f in files])
    eos = np.asarray([tokenizer.eos_id], np.uint32)
    pieces = []
    for doc in _documents(files, text_field, max_bytes):
        pieces += [tokenizer.encode(doc), eos]
    if not pieces:
        raise ValueError("data: no documents were read (empty files, or max_data_bytes smaller than the first)")
    return TokenStream([np.concatenate(pieces)])


class Windows:
    """Random access to packed windows of seq_len + 1 tokens, stride seq_len, over a stream; optionally only the
    windows listed in `ids` (a split)."""

    def __init__(self, stream: TokenStream, seq_len: int, ids: np.ndarray | None = None):
        self.stream, self.seq_len = stream, seq_len
        total = max(0, (len(stream) - 1) // seq_len)
        self.ids = np.arange(total) if ids is None else np.asarray(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        """[seq_len + 1] int32 tokens of window i (of this split)."""
        lo = int(self.ids[i]) * self.seq_len
        return self.stream.read(lo, lo + self.seq_len + 1)


def split(stream: TokenStream, seq_len: int, val_fraction: float) -> tuple[Windows, Windows]:
    """(train, val) windows: every round(1 / val_fraction)-th window is validation."""
    ids = Windows(stream, seq_len).ids
    period = max(2, round(1 / val_fraction))
    is_val = ids % period == period - 1
    return Windows(stream, seq_len, ids[~is_val]), Windows(stream, seq_len, ids[is_val])


def _load_batch(windows: Windows, indices: np.ndarray, cols: slice, separator: int | None) -> dict[str, np.ndarray]:
    w = np.stack([windows[int(i)] for i in indices])  # [b, T + 1]
    batch = {"inputs": w[:, :-1], "targets": w[:, 1:]}
    if separator is not None:
        batch["segment_ids"] = document_ids(batch["inputs"], separator)
    return {name: np.ascontiguousarray(x[:, cols]) for name, x in batch.items()}


def train_batches(windows: Windows, *, batch_size: int, seed: int, host: HostSlice, threads: int = 2,
                  separator: int | None = None):
    """An endless Grain IterDataset of this host's part of each shuffled global batch.

    Yields {"inputs", "targets"} and, given the separator token id, "segment_ids" (document_ids): [rows, cols]
    int32 (rows/cols from `host`). Its iterator is resumable.
    """
    if len(windows) < batch_size:
        raise ValueError(f"data: only {len(windows)} training sequences of seq_len {windows.seq_len}, fewer than "
                         f"one batch of {batch_size}; give more data or a smaller seq_len/batch_size")
    ds = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda idx: _load_batch(windows, idx[host.rows], host.cols, separator))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


def val_batches(windows: Windows, *, batch_size: int, n_batches: int, host: HostSlice,
                separator: int | None = None) -> list[dict]:
    """n_batches global validation batches of windows evenly spaced over the validation split (fewer batches if
    it is short), the same at every evaluation; their keys as train_batches'."""
    n = min(n_batches, len(windows) // batch_size)
    if n == 0:
        raise ValueError(f"data: validation holds {len(windows)} sequences, fewer than one batch of {batch_size}; "
                         "raise val_fraction or lower batch_size")
    picks = np.linspace(0, len(windows) - 1, n * batch_size).round().astype(np.int64)
    return [_load_batch(windows, picks[i:i + batch_size][host.rows], host.cols, separator)
            for i in range(0, len(picks), batch_size)]
