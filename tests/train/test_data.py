"""The data pipeline: tokenizers, packing, .txt/.jsonl/.bin sources, per-host shares, deterministic resumable order."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from train import data
from train.tokenizer import ByteTokenizer, load_tokenizer

FULL = data.HostSlice(slice(None), slice(None))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _stream(n, seq_len=8):
    return data.Windows(data.TokenStream([np.arange(n, dtype=np.uint32)]), seq_len)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return x  # ∑"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text + "\n"


def test_hf_tokenizer_json(tmp_path):
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 2,
                                                            "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = load_tokenizer(str(path))
    assert hf.vocab_size == 4 and hf.eos_id == 0
    assert hf.encode("hello world hello").tolist() == [2, 3, 2]
    with pytest.raises(ValueError, match="no separator token"):
        load_tokenizer(str(path), eos_token="</s>")


def test_packing_separates_documents_and_every_token_is_a_target_once(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "de"}) + "\n\n" + json.dumps({"text": "fgh"}) + "\n")
    files = data.resolve_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    tok = ByteTokenizer()
    stream = data.token_stream(files, tok)
    eos = tok.eos_id
    expect = [*b"abc", eos, *b"de", eos, *b"fgh", eos]
    assert stream.read(0, len(stream)).tolist() == expect
    windows = data.Windows(stream, 3)
    assert len(windows) == (len(expect) - 1) // 3
    for i in range(len(windows)):
        w = windows[i]
        assert w.tolist() == expect[3 * i:3 * i + 4]  # seq_len + 1 tokens, stride seq_len
    targets = np.concatenate([windows[i][1:] for i in range(len(windows))])
    assert targets.tolist() == expect[1:1 + 3 * len(windows)]


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2 has no string field 'text'"):
        data.token_stream([f], ByteTokenizer())


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_files_are_memory_mapped_in_order(tmp_path, dtype):
    a = np.arange(0, 50, dtype=dtype)
    b = np.arange(50, 90, dtype=dtype) * (1 if dtype == "uint16" else 100_000)
    a.tofile(tmp_path / "0.bin")
    b.tofile(tmp_path / "1.bin")
    stream = data.token_stream(data.resolve_files([str(tmp_path / "*.bin")]), None, bin_dtype=dtype)
    assert len(stream) == 90
    assert stream.read(45, 55).tolist() == np.concatenate([a, b])[45:55].astype(np.int64).tolist()


def test_resolve_files_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.resolve_files([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="matches no files"):
        data.resolve_files([str(tmp_path / "*.txt")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown suffix"):
        data.resolve_files([str(tmp_path / "x.csv")])
    (tmp_path / "t.txt").write_text("a")
    np.zeros(4, np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="mixes pre-tokenized"):
        data.resolve_files([str(tmp_path / "t.txt"), str(tmp_path / "t.bin")])


def test_stdlib_source_is_real_text():
    files = data.stdlib_files()
    assert len(files) > 100 and any(f.name == "argparse.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_each_epoch_visits_every_window_once_in_a_new_order():
    windows = _stream(8 * 12 + 1)  # 12 windows
    it = iter(data.train_batches(windows, batch_size=4, seed=3, host=FULL, threads=1))
    epochs = [np.concatenate([b["inputs"][:, 0] // 8 for b in _take(it, 3)]) for _ in range(2)]
    assert sorted(epochs[0].tolist()) == list(range(12)) == sorted(epochs[1].tolist())
    assert epochs[0].tolist() != epochs[1].tolist()
    b = _take(iter(data.train_batches(windows, batch_size=4, seed=3, host=FULL, threads=1)), 1)[0]
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])


def test_order_is_deterministic_and_resumes_exactly_in_a_fresh_pipeline():
    windows = _stream(8 * 40 + 1)
    make = lambda: iter(data.train_batches(windows, batch_size=4, seed=7, host=FULL, threads=2))  # noqa: E731
    straight = [b["inputs"] for b in _take(make(), 12)]
    first = make()
    _take(first, 5)
    state = first.get_state()
    resumed = make()  # a new pipeline, as after a restart
    resumed.set_state(state)
    for got, want in zip([b["inputs"] for b in _take(resumed, 7)], straight[5:]):
        np.testing.assert_array_equal(got, want)
    other = [b["inputs"] for b in _take(iter(data.train_batches(windows, batch_size=4, seed=8, host=FULL)), 3)]
    assert any(not np.array_equal(a, b) for a, b in zip(other, straight))


def test_hosts_read_disjoint_shares_that_tile_the_global_batch():
    windows = _stream(8 * 20 + 1)
    full = _take(iter(data.train_batches(windows, batch_size=4, seed=1, host=FULL)), 3)
    hosts = [data.HostSlice(slice(0, 2), slice(0, 8)), data.HostSlice(slice(2, 4), slice(0, 4)),
             data.HostSlice(slice(2, 4), slice(4, 8))]
    parts = [_take(iter(data.train_batches(windows, batch_size=4, seed=1, host=h)), 3) for h in hosts]
    for step in range(3):
        glued = np.zeros_like(full[step]["inputs"])
        for h, p in zip(hosts, parts):
            assert p[step]["inputs"].shape == (h.rows.stop - h.rows.start, h.cols.stop - h.cols.start)
            glued[h.rows, h.cols] = p[step]["inputs"]
        np.testing.assert_array_equal(glued, full[step]["inputs"])


def test_too_little_data_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        data.train_batches(_stream(8 * 5 + 1), batch_size=16, seed=0, host=FULL)
    train, val = data.split(data.TokenStream([np.arange(1001, dtype=np.uint32)]), 8, 0.05)
    assert len(train) + len(val) == 125 and len(val) == 6  # every 20th window
    assert set(train.ids).isdisjoint(val.ids) and val[0][0] == 19 * 8
    with pytest.raises(ValueError, match="raise val_fraction"):
        data.val_batches(val, batch_size=16, n_batches=2, host=FULL)


def test_binary_data_named_txt_is_warned_about(tmp_path):
    """Random bytes in a .txt file decode to mostly replacement characters: training on them is a mistake
    (pre-tokenized ids belong in .bin), so token_stream warns, naming the file; real text does not warn. In a
    .jsonl file they are an error naming the line (before, a raw UnicodeDecodeError)."""
    (tmp_path / "ids.txt").write_bytes(np.random.default_rng(0).integers(0, 2**16, 4000, np.uint16).tobytes())
    (tmp_path / "real.txt").write_text("déf f(x):\n    return x  # ∑ \ufffd\n" * 50)
    with pytest.warns(UserWarning, match=r"ids.txt' does not look like UTF-8 text \(\d+ of its \d+ characters"):
        data.token_stream([tmp_path / "ids.txt"], ByteTokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.token_stream([tmp_path / "real.txt"], ByteTokenizer())
    (tmp_path / "ids.txt").rename(tmp_path / "ids.jsonl")  # JSON lines cannot be read at all: an error
    with pytest.raises(ValueError, match=r"ids.jsonl:1 is not UTF-8 text \(invalid start byte at byte \d+"):
        data.token_stream([tmp_path / "ids.jsonl"], ByteTokenizer())
