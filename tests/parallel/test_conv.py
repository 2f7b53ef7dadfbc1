"""The causal convolution (lasp_jax.parallel.causal_conv) against a float64 NumPy oracle: one device, and with the
sequence sharded over data x seq meshes (seq 2, 3, 4): outputs and dx, dweight, dbias, per rank, with documents
that cross rank boundaries and start exactly at one; and in the HLO, one halo-sized collective-permute each way
and no [halo; piece] array.

The oracle reads the definition directly: tap i of output t reads r = t - W + 1 + i when r >= 0 and r lies in
t's document (the document index, a count of id changes, is equal), unlike the code's chain of neighbour links.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.parallel.causal_conv import causal_conv1d, sharded_causal_conv1d
from tests.parallel.hlo import entry_instructions
from tests.util import document_ids, per_rank_errors, rel_err

_FAST = {"xla_backend_optimization_level": 0}  # numbers, not speed: a quicker XLA:CPU compile
# Measured over seeds 0-2 (2026-11-29, XLA:CPU), worst of y, dx, dweight, dbias on every case: 1.8e-7 (fp32);
# bf16 y against the oracle on the same rounded inputs: 1.7e-3 (one rounding of y, 2^-9 relative).
F32_TOL = 5e-7
BF16_TOL = 4e-3


def _oracle(x, weight, bias, ids, g):
    """float64 y and the gradients dx, dweight, dbias of sum(g * y)."""
    x, weight, g = (np.asarray(a, np.float64) for a in (x, weight, g))
    b, t, c = x.shape
    w = weight.shape[0]
    docs = np.zeros((b, t), int) if ids is None else np.cumsum(
        np.pad(np.diff(np.asarray(ids), axis=1) != 0, ((0, 0), (1, 0))), axis=1)
    y = np.zeros_like(x) + (0.0 if bias is None else np.asarray(bias, np.float64))
    dx, dw = np.zeros_like(x), np.zeros_like(weight)
    for ti in range(t):
        for i in range(w):
            r = ti - w + 1 + i
            if r < 0:
                continue
            on = (docs[:, r] == docs[:, ti])[:, None]  # [B, 1]
            y[:, ti] += np.where(on, weight[i] * x[:, r], 0.0)
            dx[:, r] += np.where(on, weight[i] * g[:, ti], 0.0)
            dw[i] += np.where(on, x[:, r] * g[:, ti], 0.0).sum(0)
    return y, dx, dw, g.sum((0, 1))


def _inputs(rng, b, t, c, w, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal((b, t, c)), dtype)
    weight = jnp.asarray(rng.standard_normal((w, c)) / np.sqrt(w), dtype)
    bias = jnp.asarray(rng.standard_normal(c), dtype)
    g = jnp.asarray(rng.standard_normal((b, t, c)), jnp.float32)
    return x, weight, bias, g


def _documents(b, t, starts):
    """[B, T] ids: row j's documents start at `starts` (and 0), ids shifted per row so they differ across rows;
    the last row is one document."""
    ids = document_ids([starts] * b, t)
    ids[-1] = 7
    return jnp.asarray(ids * 1000 + np.arange(b)[:, None])


def _loss(conv, x, weight, bias, g, **kw):
    y = conv(x, weight, bias, **kw)
    return jnp.sum(y.astype(jnp.float32) * g), y


@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "documents"])
def test_one_device_matches_oracle(w, docs, rng):
    b, t, c = 2, 13, 6
    x, weight, bias, g = _inputs(rng, b, t, c, w)
    ids = _documents(b, t, [1, 3, 4, 9]) if docs else None  # documents of length 1, 2, 1, 5, 4
    grad = jax.jit(jax.value_and_grad(lambda *a: _loss(causal_conv1d, *a, g, segment_ids=ids), argnums=(0, 1, 2),
                                      has_aux=True), compiler_options=_FAST)
    (_, y), grads = grad(x, weight, bias)
    y_ref, *grads_ref = _oracle(x, weight, bias, ids, g)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < F32_TOL
    for name, a, ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert rel_err(a, ref) < F32_TOL, name


def test_documents_do_not_see_each_other(rng):
    """A document's outputs do not depend on what precedes it: moving it after other content changes nothing."""
    x, weight, bias, _ = _inputs(rng, 1, 8, 3, 4)
    other = jnp.full((1, 3, 3), jnp.nan)  # non-finite input in the other document must not leak either
    ids = jnp.asarray([[0, 0, 0] + [1] * 8])
    y = causal_conv1d(jnp.concatenate([other, x], axis=1), weight, bias, segment_ids=ids)[:, 3:]
    np.testing.assert_array_equal(y, causal_conv1d(x, weight, bias))


def test_bf16_rounds_once(rng):
    """bf16 x and weight: the float32 sum, one rounding of y (against the oracle on the same rounded inputs)."""
    x, weight, bias, g = _inputs(rng, 2, 16, 8, 4, jnp.bfloat16)
    ids = _documents(2, 16, [5, 6])
    y = causal_conv1d(x, weight, bias, segment_ids=ids)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, _oracle(x, weight, bias, ids, g)[0]) < BF16_TOL


@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_one_device_form_takes_a_batch_sharded_x(kind, docs, rng):
    """causal_conv1d (no seq split) on x sharded over 'data' of a data x seq mesh: its zero padding follows x's
    sharding (an unsharded one cannot be concatenated with x on an Explicit mesh: it failed so before); y and dx
    stay batch-sharded on the Explicit mesh, and y, dx, dweight, dbias match the oracle on both."""
    b, t, c, w = 4, 9, 6, 4
    x, weight, bias, g = _inputs(rng, b, t, c, w)
    ids = _documents(b, t, [2, 3, 7]) if docs else None
    mesh = jax.make_mesh((4, 2), ("data", "seq"), axis_types=(kind,) * 2)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        f = jax.value_and_grad(lambda *a: _loss(causal_conv1d, *a, g, segment_ids=ids), argnums=(0, 1, 2),
                               has_aux=True)
        (_, y), grads = jax.jit(f, compiler_options=_FAST)(xs, weight, bias)
    if kind == AxisType.Explicit:  # in the types; on an Auto mesh XLA picks the outputs' shardings
        assert y.sharding.spec == grads[0].sharding.spec == P("data", None, None), (y.sharding, grads[0].sharding)
    y_ref, *grads_ref = _oracle(x, weight, bias, ids, g)
    assert rel_err(y, y_ref) < F32_TOL
    for name, a, ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert rel_err(a, ref) < F32_TOL, name


def test_one_device_form_refuses_a_sequence_sharded_x(rng):
    x, weight, _, _ = _inputs(rng, 2, 8, 3, 4)
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="sequence axis is sharded over 'seq'.*sharded_causal"):
        causal_conv1d(jax.device_put(x, NamedSharding(mesh, P("data", "seq"))), weight)


# (data, seq, axis type, L per rank, document starts): starts at rank boundaries (multiples of L) and documents
# shorter than the halo that cross one.
MESHES = {
    "2x2-explicit": ((2, 2), AxisType.Explicit, 5, [5, 7, 8]),
    "2x3-auto": ((2, 3), AxisType.Auto, 4, [2, 4, 9, 10]),
    "1x3-explicit": ((1, 3), AxisType.Explicit, 3, [3, 4, 8]),  # L = W-1: the halo is the whole piece
    "2x4-explicit": ((2, 4), AxisType.Explicit, 4, [3, 8, 11, 13]),
}


def _check_sharded(case, w, docs, rng, activation=None):
    """sharded_causal_conv1d of width w on MESHES[case]: y, dx per rank, dweight, dbias against the oracle, or with
    an activation (which the oracle does not apply) against the one-device convolution (impl "xla")."""
    (data, n), kind, length, starts = MESHES[case]
    b, t, c = 2 * data, length * n, 6
    x, weight, bias, g = _inputs(rng, b, t, c, w)
    ids = _documents(b, t, starts) if docs else None
    kw = {"segment_ids": ids} if activation is None else {"segment_ids": ids, "activation": activation, "impl": "xla"}
    grad = lambda conv: jax.value_and_grad(  # noqa: E731
        lambda *a: _loss(conv, *a, g, **kw), argnums=(0, 1, 2), has_aux=True)
    mesh = jax.make_mesh((data, n), ("data", "seq"), axis_types=(kind,) * 2, devices=jax.devices()[:data * n])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
        (_, y), grads = jax.jit(grad(sharded_causal_conv1d), compiler_options=_FAST)(xs, weight, bias)
    assert y.dtype == x.dtype and y.shape == x.shape and y.sharding.spec[:2] == ("data", "seq"), y.sharding
    if activation is None:
        y_ref, *grads_ref = _oracle(x, weight, bias, ids, g)
    else:
        (_, y_ref), grads_ref = jax.jit(grad(causal_conv1d), compiler_options=_FAST)(x, weight, bias)
    assert max(per_rank_errors(y, y_ref, n)) < F32_TOL
    # dx per rank: a rank's last W-1 positions get part of their gradient from the next rank (the halo's).
    assert max(per_rank_errors(grads[0], grads_ref[0], n)) < F32_TOL
    for name, a, ref in zip(("dweight", "dbias"), grads[1:], grads_ref[1:]):
        assert rel_err(a, ref) < F32_TOL, name


@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("case", MESHES)
def test_sharded_matches_oracle(case, docs, rng):
    _check_sharded(case, 4, docs, rng)


@pytest.mark.parametrize("w", [1, 2])
def test_sharded_other_widths_match_oracle(w, rng):
    """Widths other than Mamba-2's 4 on a seq-3 mesh with documents: W = 1 (no halo: the one-device form on every
    rank) and W = 2 (a one-position halo and halo term)."""
    _check_sharded("2x3-auto", w, True, rng)


def test_sharded_silu_matches_one_device(rng):
    """activation="silu" on a seq-3 mesh with documents: the halo's taps join the first W-1 sums before the SiLU
    (impl "xla"), so y, dx per rank, dweight and dbias equal the one-device convolution's."""
    _check_sharded("2x3-auto", 4, True, rng, activation="silu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_inside_a_callers_shard_map(dtype, rng):
    """seq already manual: the local pieces. bf16 halos travel as bytes with the ids; ids whose bytes would be
    float NaNs or subnormals still compare exactly (documents start at 4 and at the rank boundaries 6 and 9)."""
    x, weight, bias, _ = _inputs(rng, 2, 12, 4, 4, dtype)
    ids = jnp.asarray(np.repeat([[1, 0x7F810001, 0x7FC00001, 0x7FC00002]], [4, 2, 3, 3], axis=1).repeat(2, 0),
                      jnp.int32)
    mesh = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    spec = P(None, "seq")
    with jax.set_mesh(mesh):
        f = jax.shard_map(lambda x, ids: sharded_causal_conv1d(x, weight, bias, segment_ids=ids), mesh=mesh,
                          in_specs=(spec, spec), out_specs=spec)
        y = jax.jit(f, compiler_options=_FAST)(*(jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, ids)))
    assert y.dtype == dtype
    assert rel_err(y, _oracle(x, weight, bias, ids, x)[0]) < (F32_TOL if dtype == jnp.float32 else BF16_TOL)


def test_channels_stay_sharded(rng):
    """Channels sharded over a third axis (as lasp_attention's heads): each device convolves its own, with its
    slice of weight and bias, and y keeps x's sharding."""
    x, weight, bias, g = _inputs(rng, 2, 8, 6, 4)
    ids = _documents(2, 8, [3, 4])
    mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "model"), axis_types=(AxisType.Explicit,) * 3)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq", "model")))
        f = jax.value_and_grad(lambda *a: _loss(sharded_causal_conv1d, *a, g, segment_ids=ids), argnums=(0, 1, 2),
                               has_aux=True)
        (_, y), grads = jax.jit(f, compiler_options=_FAST)(xs, weight, bias)
    assert y.sharding.spec == P("data", "seq", "model"), y.sharding
    y_ref, *grads_ref = _oracle(x, weight, bias, ids, g)
    assert rel_err(y, y_ref) < F32_TOL
    for name, a, ref in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        assert rel_err(a, ref) < F32_TOL, name


def _elements(shape: str) -> int:
    """The number of elements of an HLO shape, summed over a tuple's arrays ("(f32[1,8], f32[1,8])" -> 16)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", shape))


@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "documents"])
def test_hlo_passes_only_the_halo(docs):
    """Forward and backward: one collective-permute each way (r -> r+1, then r+1 -> r), halo-sized; besides them
    only the all-reduce of dweight (the replicated weight's gradient, summed over ranks)."""
    n, b, length, c, w = 4, 2, 64, 8, 4
    mesh = jax.make_mesh((1, n), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:n])
    ids = jnp.zeros((b, n * length), jnp.int32) if docs else None

    def loss(x, weight):
        return jnp.sum(sharded_causal_conv1d(x, weight, segment_ids=ids) ** 2)

    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((b, n * length, c)), NamedSharding(mesh, P("data", "seq")))
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, jnp.ones((w, c))).compile().as_text()
    colls = [i for i in entry_instructions(text).values() if i.is_collective]
    permutes = [i for i in colls if i.opcode == "collective-permute"]
    assert len(permutes) == 2, [i.opcode for i in colls]
    assert [(i.opcode, _elements(i.shape)) for i in colls if i not in permutes] == [("all-reduce", w * c)]
    halo_bytes = b * (w - 1) * c * 4
    moved = {}
    for p in permutes:
        (shift,) = {t - s for s, t in p.pairs}  # one uniform shift
        assert len(p.pairs) == n - 1  # no wrap-around: rank 0 receives zeros
        moved[shift] = p.size * {"u8": 1, "f32": 4}[p.shape.split("[")[0]]
    # forward: the halo (with documents as bytes, with its int32 ids); backward: the halo's fp32 gradient
    assert moved == {1: halo_bytes + (b * (w - 1) * 4 if docs else 0), -1: halo_bytes}
    assert halo_bytes < b * length * c * 4  # a rank's piece: "halo-sized" is a real distinction here
    # The piece is convolved as on one device, with the halo's taps added to its first W-1 sums: [halo; piece] is
    # never built, as a concatenated copy (129 ms a step at Mamba-2 1.3B's seq-2 shape on H200s, where XLA
    # materialized it) or as a select of two pads (which every pass over the piece read), and no piece-sized
    # array is overwritten (the recomputed first W-1 outputs, whose overwrite XLA fused into every pass over y).
    def produces(op, shape):
        return [line for line in text.splitlines() if op in line and shape in line.split(op)[0]]

    for op in ("concatenate(", "select("):
        assert not produces(op, f"[{b},{w - 1 + length},{c}]"), op
    assert not produces("dynamic-update-slice(", f"[{b},{length},{c}]")
    assert not produces("concatenate(", f"[{b},{2 * (w - 1)},{c}]")  # nor [halo; first W-1 positions]


def test_bad_input_is_a_clear_error(rng):
    x, weight, bias, _ = _inputs(rng, 2, 12, 4, 4)
    mesh = jax.make_mesh((1, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    bad = [
        (dict(x=x[0]), "x must have rank 3"),
        (dict(x=x.astype(jnp.int32)), "x must be a floating"),
        (dict(weight=weight[:, :3]), "weight must have shape"),
        (dict(weight=weight[:0]), "weight must have shape"),
        (dict(bias=bias[:2]), "bias must have shape"),
        (dict(segment_ids=jnp.zeros((2, 11), jnp.int32)), "segment_ids must have shape"),
        (dict(segment_ids=jnp.zeros((2, 12))), "segment_ids must be an integer"),
    ]
    for change, message in bad:
        args = dict(x=x, weight=weight, bias=bias, segment_ids=None) | change
        with pytest.raises(ValueError, match=message):
            causal_conv1d(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)
    with pytest.raises(ValueError, match="divisible"):
        sharded_causal_conv1d(x[:, :10], weight, mesh=mesh)
    with pytest.raises(ValueError, match="at least W-1 = 3"):
        sharded_causal_conv1d(x[:, :8], weight, mesh=mesh)  # L = 2
    with pytest.raises(ValueError, match="no axis"):
        sharded_causal_conv1d(x, weight, mesh=mesh, seq_axis="sp")
    with pytest.raises(ValueError, match="needs a mesh"):
        sharded_causal_conv1d(x, weight)
