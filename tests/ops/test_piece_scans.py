"""The piece scans of the fused kernel path (`lasp_jax.ops.pieces`: entering, leaving, from_zero's boundary sums; the
scan kernel of `lasp_jax.ops.piece_scan_kernel` in Pallas interpret mode) against a float64 loop over the pieces,
for constant rates [H] and per-piece log decays [B, H, P] (+inf: a document starts in the piece; up to P = 128
pieces, whose products underflow), and their NaN isolation: a non-finite sum reaches only the pieces after its own
(before it, for the cotangents), a document start passes exactly nothing, while a product of nonzero decays that
underflows and a NaN decay are no cut (a NaN decay before anything enters reaches nothing). The reverse scan's dots
against the next piece's state (the decay gradient's crossing terms). The kernel itself: row tiles of Dk, its
argument checks, and its lowering to Triton IR without a GPU.

Worst relative error measured against float64 (max |got - want| / max |want|, seeds 0-2, every case below):
1.2e-7 up to P = 7 (float32 rounding of the sums and decays), TOL 3x that; 5.6e-7 at P = 128 (constant rates,
a head of rate 0: a running float32 sum of 128 unit normals), TOL_LONG under 3x that; the crossing dots 9.0e-8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType

from benchmarks import profile_pieces
from lasp_jax.ops import piece_scan_kernel, pieces
from tests.util import H200, cuda_mlir

TOL = 4e-7
TOL_LONG = 1.5e-6  # P = 128
B, H, DK, DV, PIECE_LEN = 2, 3, 4, 5, 16


def _plan(n):
    return pieces.Plan(chunk=PIECE_LEN // 2, pieces=n, piece_len=PIECE_LEN, pad=0)


def _per_piece(decay, n):
    """[B, H, P] float64 log decay of every piece: rates [H] times the piece length, or as given."""
    decay = np.asarray(decay, np.float64)
    return np.broadcast_to(decay * PIECE_LEN, (B, n, H)).transpose(0, 2, 1) if decay.ndim == 1 else decay


def _loop(sums, state, decay, reverse):
    """float64: the state entering each piece (reverse: the cotangent leaving it) and the one after the last
    piece (reverse: before the first), from state (None: zero), one piece at a time."""
    sums = np.asarray(sums, np.float64)
    n = sums.shape[2]
    a = np.exp(-_per_piece(decay, n))[..., None, None]
    s = np.zeros((B, H, DK, DV)) if state is None else np.asarray(state, np.float64)
    out = np.zeros_like(sums)
    for p in reversed(range(n)) if reverse else range(n):
        out[:, :, p] = s
        s = a[:, :, p] * s + sums[:, :, p]
    return out, s


def _rel(got, want):
    """max |got - want| / max |want|, or max |got| where want is all zero (P = 1, nothing before)."""
    err = np.max(np.abs(np.asarray(got, np.float64) - want))
    return err / np.max(np.abs(want)) if np.any(want) else err


def _inputs(rng, n):
    sums = jnp.asarray(rng.normal(size=(B, H, n, DK, DV)), jnp.float32)
    state = jnp.asarray(rng.normal(size=(B, H, DK, DV)), jnp.float32)
    return sums, state


DECAYS = {
    "constant": lambda rng, n: jnp.asarray([0.0, 0.01, 0.3], jnp.float32),  # per piece: 1, 0.85, 8e-3
    "per piece": lambda rng, n: jnp.asarray(rng.uniform(0.0, 3.0, (B, H, n)), jnp.float32),
    "documents": lambda rng, n: jnp.asarray(
        np.where(rng.random((B, H, n)) < 0.3, np.inf, rng.uniform(0.0, 0.5, (B, H, n))), jnp.float32),
}


@pytest.mark.parametrize("n", [1, 2, 7, 128])
@pytest.mark.parametrize("kind", DECAYS)
@pytest.mark.parametrize("with_state", [False, True])
def test_scans_match_a_float64_loop(kind, n, with_state, rng):
    sums, state = _inputs(rng, n)
    decay = DECAYS[kind](rng, n)
    state = state if with_state else None
    plan = _plan(n)
    enter_want, end_want = _loop(sums, state, decay, reverse=False)
    leave_want, start_want = _loop(sums, state, decay, reverse=True)
    enter = pieces.entering(sums, state, decay, plan)
    leave = pieces.leaving(sums, state, decay, plan)
    tol = TOL if n <= 7 else TOL_LONG
    assert enter.dtype == leave.dtype == jnp.float32 and enter.shape == leave.shape == sums.shape
    assert _rel(enter, enter_want) < tol and _rel(leave, leave_want) < tol
    # from_zero also carries the sums alone (no state) to the call's end, or its start
    _, end_from_zero = _loop(sums, None, decay, reverse=False)
    _, start_from_zero = _loop(sums, None, decay, reverse=True)
    assert _rel(pieces.from_zero(sums, decay, plan, reverse=False)[1], end_from_zero) < tol
    assert _rel(pieces.from_zero(sums, decay, plan, reverse=True)[1], start_from_zero) < tol


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("kind", ["constant", "per piece"])
def test_a_non_finite_piece_reaches_only_the_pieces_after_it(kind, bad, rng):
    """A non-finite m_j (one element of piece j's sums): the states entering pieces 0..j are finite and equal to
    the clean run's; every later one is non-finite at that element. The cotangents mirror it: pieces j..P-1
    clean, the earlier ones non-finite."""
    n, j = 7, 3
    sums, state = _inputs(rng, n)
    decay = DECAYS[kind](rng, n)
    plan = _plan(n)
    poisoned = sums.at[:, :, j, 1, 2].set(bad)
    for scan, clean_pieces, reached in ((pieces.entering, slice(0, j + 1), slice(j + 1, n)),
                                        (pieces.leaving, slice(j, n), slice(0, j))):
        clean = np.asarray(scan(sums, state, decay, plan))
        got = np.asarray(scan(poisoned, state, decay, plan))
        np.testing.assert_array_equal(got[:, :, clean_pieces], clean[:, :, clean_pieces])
        assert not np.any(np.isfinite(got[:, :, reached, 1, 2]))
        others = np.ones((DK, DV), bool)
        others[1, 2] = False
        np.testing.assert_array_equal(got[:, :, reached][..., others], clean[:, :, reached][..., others])


@pytest.mark.parametrize("huge", [1e30, np.nan, np.inf])
def test_a_document_start_passes_exactly_nothing(huge, rng):
    """A piece c whose log decay is +inf (a document starts in it) cuts the chain: what enters the pieces after
    c does not depend on the sums before c nor on S_in, bit for bit (their weights are exactly 0, never NaN, even
    for sums of 1e30, and a NaN or inf there stops at c); what leaves the pieces before c, likewise, on the sums
    after c and on g; the end state, on the sums before c."""
    n, c = 7, 3
    sums, state = _inputs(rng, n)
    decay = jnp.asarray(rng.uniform(0.0, 0.5, (B, H, n)), jnp.float32).at[:, :, c].set(jnp.inf)
    plan = _plan(n)
    huge = jnp.float32(huge)
    before, after = sums.at[:, :, :c].set(huge), sums.at[:, :, c + 1:].set(huge)
    enter = np.asarray(pieces.entering(before, huge * state, decay, plan))
    enter_cut = np.asarray(pieces.entering(sums.at[:, :, :c].set(0.0), None, decay, plan))
    np.testing.assert_array_equal(enter[:, :, c + 1:], enter_cut[:, :, c + 1:])
    leave = np.asarray(pieces.leaving(after, huge * state, decay, plan))
    leave_cut = np.asarray(pieces.leaving(sums.at[:, :, c + 1:].set(0.0), None, decay, plan))
    np.testing.assert_array_equal(leave[:, :, :c], leave_cut[:, :, :c])
    end = pieces.from_zero(before, decay, plan, reverse=False)[1]
    np.testing.assert_array_equal(end, pieces.from_zero(sums.at[:, :, :c].set(0.0), decay, plan, reverse=False)[1])


def test_a_wrong_decay_shape_is_named():
    sums = jnp.zeros((B, H, 4, DK, DV), jnp.float32)
    with pytest.raises(ValueError, match=r"per-piece log decays \[B, H, P=4\]"):
        pieces.entering(sums, None, jnp.zeros((B, H, 3)), _plan(4))


def test_the_profiles_xla_forms_agree(rng):
    """The XLA forms of the scans the profile (benchmarks/profile_pieces.py) times against the library's kernel:
    the select over [B, H, P, P, Dk, Dv], the [P, P] matmul without non-finite routing, the unrolled recurrence."""
    n = 7
    sums, _ = _inputs(rng, n)
    rates = DECAYS["constant"](rng, n)
    for reverse, library in ((False, pieces.entering), (True, pieces.leaving)):
        want = np.asarray(library(sums, None, rates, _plan(n)), np.float64)
        for form in (profile_pieces.select_scan, profile_pieces.unrouted_scan, profile_pieces.recurrence_scan):
            assert _rel(form(sums, rates, _plan(n), reverse=reverse), want) < TOL


def test_an_underflowed_product_and_a_nan_decay_are_no_cut(rng):
    """Pieces of log decay 40 (each passes exp(-40) != 0; the product over 3 of them underflows to 0 in float32):
    a NaN in piece 0 still reaches every later piece (it is no document start), as a NaN decay in piece j does
    the pieces after j. The finite parts match the float64 loop (the underflowed weights are 0 in both)."""
    n, j = 7, 3
    sums, _ = _inputs(rng, n)
    steep = jnp.full((B, H, n), 40.0, jnp.float32)
    enter = np.asarray(pieces.entering(sums, None, steep, _plan(n)))
    assert _rel(enter, _loop(sums, None, steep, reverse=False)[0]) < TOL
    got = np.asarray(pieces.entering(sums.at[:, :, 0, 1, 2].set(jnp.nan), None, steep, _plan(n)))
    assert np.all(np.isnan(got[:, :, 1:, 1, 2]))
    got = np.asarray(pieces.entering(sums, None, steep.at[:, :, j].set(jnp.nan), _plan(n)))
    np.testing.assert_array_equal(got[:, :, :j + 1], enter[:, :, :j + 1])
    assert np.all(np.isnan(got[:, :, j + 1:]))


def test_a_nan_decay_before_anything_enters_reaches_nothing(rng):
    """A NaN decay in the first piece (the last, for the cotangents) multiplies only the zero state entering it:
    without a boundary state every scan is bit for bit the one of a finite decay there (S_1 = m_0, as in the
    products of `entering`'s formula), with one the NaN reaches every later piece through its share."""
    n = 5
    sums, state = _inputs(rng, n)
    decay = DECAYS["per piece"](rng, n)
    for scan, edge in ((pieces.entering, 0), (pieces.leaving, n - 1)):
        clean = np.asarray(scan(sums, None, decay, _plan(n)))
        np.testing.assert_array_equal(np.asarray(scan(sums, None, decay.at[:, :, edge].set(jnp.nan), _plan(n))), clean)
        shared = np.asarray(scan(sums, state, decay.at[:, :, edge].set(jnp.nan), _plan(n)))
        later = slice(1, n) if edge == 0 else slice(0, n - 1)
        assert np.all(np.isnan(shared[:, :, later]))
    for reverse, edge in ((False, 0), (True, n - 1)):
        end = pieces.from_zero(sums, decay.at[:, :, edge].set(jnp.nan), _plan(n), reverse=reverse)[1]
        np.testing.assert_array_equal(np.asarray(end), np.asarray(pieces.from_zero(sums, decay, _plan(n),
                                                                                    reverse=reverse)[1]))


@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_row_tiles(reverse, rng):
    """The kernel over Dk in 4 row tiles of 8 (one program each) equals one whole-Dk tile bit for bit, and the
    float64 loop."""
    n, dk, dv = 5, 32, 16
    sums = jnp.asarray(rng.normal(size=(1, 2, n, dk, dv)), jnp.float32)
    decays = jnp.asarray(rng.uniform(0.0, 1.0, (1, 2, n)), jnp.float32).at[0, 1, 2].set(0.0)
    tiled = piece_scan_kernel.scan(sums, decays, reverse=reverse, interpret=True, block=8)
    whole = piece_scan_kernel.scan(sums, decays, reverse=reverse, interpret=True, block=dk)
    for a, b in zip(tiled, whole):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, want = np.zeros((1, 2, dk, dv)), np.zeros((1, 2, n, dk, dv))
    for p in reversed(range(n)) if reverse else range(n):
        want[:, :, p] = state
        state = np.asarray(decays, np.float64)[:, :, p, None, None] * state + np.asarray(sums, np.float64)[:, :, p]
    assert _rel(tiled[0], want) < TOL and _rel(tiled[1], state) < TOL


@pytest.mark.parametrize("n", [1, 7])
def test_dots_against_the_next_state(n, rng):
    """from_zero's dots (reverse, against the entering states, with documents and 2 row tiles of Dk):
    <S_(p+1), G_p> against float64 products of the kernel's own G_p, 0 for the last piece; a NaN entering state
    reaches only its own piece's dot."""
    sums = jnp.asarray(rng.normal(size=(B, H, n, 16, DV)), jnp.float32)
    against = jnp.asarray(rng.normal(size=(B, H, n, 16, DV)), jnp.float32)
    decay = DECAYS["documents"](rng, n)
    out, _, dots = pieces.from_zero(sums, decay, _plan(n), reverse=True, against=against)
    want = np.sum(np.asarray(against, np.float64)[:, :, 1:] * np.asarray(out, np.float64)[:, :, :-1], axis=(3, 4))
    assert dots.shape == (B, H, n) and np.all(np.asarray(dots)[:, :, -1] == 0)
    if n > 1:
        assert _rel(dots[:, :, :-1], want) < TOL
        _, _, poisoned = pieces.from_zero(sums, decay, _plan(n), reverse=True, against=against.at[:, :, 2].set(jnp.nan))
        hit = np.zeros(n, bool)
        hit[1] = True
        assert np.all(np.isnan(np.asarray(poisoned)[:, :, hit]))
        np.testing.assert_array_equal(np.asarray(poisoned)[:, :, ~hit], np.asarray(dots)[:, :, ~hit])


def test_kernel_default_block_fills_the_target_programs():
    assert piece_scan_kernel.default_block(1, 16, 128, 128) == 8  # 256 programs
    assert piece_scan_kernel.default_block(1, 64, 128, 64) == 32  # Mamba-2 1.3B's heads: 256 programs
    assert piece_scan_kernel.default_block(8, 32, 128, 128) == 16  # tiles capped at MAX_TILE elements
    assert piece_scan_kernel.default_block(8, 32, 128, 256) == 8
    assert piece_scan_kernel.default_block(1, 1, 4, 4) == 4  # never above Dk


def test_kernel_bad_arguments_are_named():
    sums = jnp.zeros((1, 2, 3, 16, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"sums must be \[B, H, P, Dk, Dv\]"):
        piece_scan_kernel.scan(sums[0], jnp.zeros((2, 3)), reverse=False, interpret=True)
    with pytest.raises(ValueError, match=r"decays must be \[B, H, P\]"):
        piece_scan_kernel.scan(sums, jnp.zeros((1, 2, 4)), reverse=False, interpret=True)
    with pytest.raises(ValueError, match="power of two dividing Dk=16"):
        piece_scan_kernel.scan(sums, jnp.zeros((1, 2, 3)), reverse=False, interpret=True, block=12)
    with pytest.raises(ValueError, match="against is for the reverse scan"):
        piece_scan_kernel.scan(sums, jnp.zeros((1, 2, 3)), reverse=False, interpret=True, against=sums)


def test_kernel_lowers_to_triton():
    """Without a GPU: the compiled kernel (not interpreted) lowers to Triton IR for an abstract H200 at the
    per-token profile's shape (B = 1, H = 16, P = 128, d = 128), one launch per scan."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H200)
    sums = jax.ShapeDtypeStruct((1, 16, 128, 128, 128), jnp.float32)
    log_decay = jax.ShapeDtypeStruct((1, 16, 128), jnp.float32)
    plan = pieces.Plan(chunk=64, pieces=128, piece_len=512, pad=0)
    text = cuda_mlir(lambda x, a: pieces.from_zero(x, a, plan, reverse=True, interpret=False), mesh, sums, log_decay)
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_kernel_matches_a_float64_loop(reverse, rng):
    """The compiled kernel at d = 128 over P = 128 pieces (the per-token profile's shape at H = 4) with document
    starts and a NaN sum: the float64 loop's values within TOL_LONG where it is finite, NaN exactly where it is."""
    b, h, n, d = 1, 4, 128, 128
    sums = rng.normal(size=(b, h, n, d, d)).astype(np.float32)
    sums[0, 1, 40, 3, 5] = np.nan
    log_decay = np.where(rng.random((b, h, n)) < 0.05, np.inf, rng.uniform(0.0, 0.5, (b, h, n)))
    decays = np.exp(-log_decay).astype(np.float32)
    out, end = piece_scan_kernel.scan(jnp.asarray(sums), jnp.asarray(decays), reverse=reverse, interpret=False)
    state, want = np.zeros((b, h, d, d)), np.zeros((b, h, n, d, d))
    for p in reversed(range(n)) if reverse else range(n):
        want[:, :, p] = state
        a = decays[:, :, p, None, None].astype(np.float64)
        state = np.where(a == 0, 0.0, a * state) + sums[:, :, p]
    for got, ref in ((out, want), (end, state)):
        got = np.asarray(got, np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        finite = ~np.isnan(ref)
        assert np.max(np.abs(got - ref)[finite]) / np.max(np.abs(ref[finite])) < TOL_LONG
