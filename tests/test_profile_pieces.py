"""benchmarks/profile_pieces.py's per-token pieces: the backward's stages it times one by one (the Q, dO state pass,
the reverse piece scan with the crossing terms' dots, and `pieces_tokens.decay_gradient` after the gradient walks)
must compose to what pieces_tokens.backward runs (a drift, e.g. a term moved into another stage, would time the
wrong thing). Checked on a backend of plain XLA sums (the decay gradient reads only the kernels' outputs), on a
ragged T (front pad), three documents, and with and without the boundary states. Its per-token table keeps one
cell per column, for measured rows and failed row sets alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_pieces
from lasp_jax.ops import pieces, pieces_tokens, vjp

B, T, H, D = 2, 60, 3, 4
PLAN = pieces.Plan(chunk=8, pieces=4, piece_len=16, pad=4)


class _SumsBackend:
    """A TokenBackend whose state pass is an einsum and whose gradient walks return fixed rows x (its piece
    scans: the scan kernel interpreted)."""

    interpret = True

    def __init__(self, x):
        self.x = x

    def plan(self, q, v):
        return PLAN

    def state_sums_tokens(self, x, y, w, plan):
        n, length = plan.pieces, plan.piece_len
        return jnp.einsum("bhpl,bplhx,bplhy->bhpxy", w.reshape(B, H, n, length),
                          x.reshape(B, n, length, H, -1), y.reshape(B, n, length, H, -1))

    def grads_tokens(self, q, k, v, do, tables, pieces_in, pieces_out, plan, scale):
        return q, k, v, self.x


@pytest.mark.parametrize("boundary", [False, True])
def test_timed_stages_compose_to_the_backward(rng, boundary):
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(4))
    rates = jnp.asarray(rng.uniform(0.001, 0.1, (B, T, H)), jnp.float32)
    ids = jnp.asarray(np.repeat([[0] * 20 + [1] * 25 + [2] * 15], B, axis=0), jnp.int32)  # starts in pieces 1, 3
    tok = vjp._piece_tokens(rates, ids, None)
    x = jnp.asarray(rng.standard_normal((B, H, PLAN.pieces * PLAN.piece_len)), jnp.float32)
    pieces_in = jnp.asarray(rng.standard_normal((B, H, PLAN.pieces, D, D)), jnp.float32)
    m, s_in, g = (jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32) for _ in range(3))
    if not boundary:
        s_in = g = None
    backend = _SumsBackend(x)

    @jax.jit
    def library(q, k, v, do, tok, pieces_in, m, s_in, g):
        outgoing = None if g is None else (lambda d: g)
        return pieces_tokens.backward(backend, q, k, v, tok, pieces_tokens.Saved(pieces_in, m, s_in), do, outgoing,
                                      0.5)[5]

    @jax.jit
    def stages(q, do, tok, pieces_in, m, s_in, g):  # the profile's backward stages, each called as it calls them
        rates_p, starts = pieces_tokens._padded(tok, PLAN)
        chunk, weights = pieces_tokens.tables(rates_p, starts, PLAN)
        sums = backend.state_sums_tokens(*(pieces.front_pad(y, PLAN.pad) for y in (q, do)),
                                         0.5 * weights.from_start, PLAN)
        _, _, dots = pieces.from_zero(sums, weights.log_decay, PLAN, reverse=True, interpret=backend.interpret,
                                      against=pieces_in)
        crossing = pieces_tokens.crossing_terms(dots, pieces_in, m, s_in, g, tok, weights.log_decay, PLAN)
        return pieces_tokens.decay_gradient(x, tok, starts, chunk.counts, crossing, PLAN)

    want = library(q, k, v, do, tok, pieces_in, m, s_in, g)
    got = stages(q, do, tok, pieces_in, m, s_in, g)
    assert got.shape == (B, T, H) and np.abs(np.asarray(want)).max() > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_per_token_table_rows_fill_its_columns():
    base = {"impl": "pallas_triton", "shape": "1x512x1x64", "decay": "tokens/2"}
    rows = [{**base, "pieces": 2, "stage": "linear_attention forward+backward", "ms": 1.5, "floor_ms": 0.25,
             "ds_rel_err_vs_fp32": 2.4e-3, "max_rel_err_vs_fp32": 3.1e-3},
            {**base, "pieces": 2, "stage": "entering", "ms": 0.125, "floor_ms": 0.0625},
            {**base, "error": "ValueError: no"}]
    lines = profile_pieces.render_tokens(rows).strip().splitlines()
    header, body = lines[-5], lines[-3:]
    assert header.startswith("| impl | shape | decay | P | stage |")
    assert [line.count("|") for line in body] == [header.count("|")] * 3
    assert body[0] == ("| pallas_triton | 1x512x1x64 | tokens/2 | 2 | linear_attention forward+backward | 1.5000 | "
                       "0.2500 | 2.4e-03 | 3.1e-03 |")
    assert body[2] == "| pallas_triton | 1x512x1x64 | tokens/2 | | error: ValueError: no | | | | |"
