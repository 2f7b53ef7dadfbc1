"""What crosses devices, read off the compiled HLO: only d_k x d_v states, in the pattern of each strategy (with
per-token decay and documents also the ranks' [B, H] log-decays and one [B] permute of boundary ids), and never
on the path of the intra-chunk work (so the collective can overlap it)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import xla
from tests.parallel.hlo import descendants, entry_instructions

W = 8
B, H, D = 2, 2, 8  # B = 2: the boundary ids' [B] permute is told apart from a scalar one
C = xla.DEFAULT.chunk_size
T = W * 2 * C  # two chunks per rank
STATE = B * H * D * D


def _compile(strategy: str, grad: bool, per_token: bool = False) -> str:
    """Constant rates, or per-token rates (differentiated too) with segment_ids."""
    mesh = jax.make_mesh((1, W), ("data", "seq"))
    seq = NamedSharding(mesh, P("data", "seq"))

    def f(q, k, v, s, ids):
        return lasp_jax.lasp_attention(q, k, v, s, segment_ids=ids, strategy=strategy, impl="xla")

    argnums = (0, 1, 2, 3) if per_token else (0, 1, 2)
    if grad:
        f = jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=argnums)
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((B, T, H, D)), seq)
        if per_token:
            s = jax.device_put(jnp.full((B, T, H), 0.1), seq)
            ids = jax.device_put(jnp.stack([jnp.arange(T) // 100, jnp.arange(T) // 77]), seq)
        else:
            s, ids = jnp.asarray([0.1, 0.5]), None
        return jax.jit(f).lower(x, x, x, s, ids).compile().as_text()


def _id(p):
    return f"{p[0]}-{'fwd+bwd' if p[1] else 'fwd'}" + ("-per_token" if p[2] else "")


@pytest.fixture(scope="module", params=[(s, g, t) for s in lasp_jax.parallel.STRATEGIES for g in (False, True)
                                        for t in (False, True)], ids=_id)
def compiled(request):
    strategy, grad, per_token = request.param
    return strategy, grad, per_token, entry_instructions(_compile(strategy, grad, per_token))


def test_expected_collectives_and_nothing_that_grows_with_T(compiled):
    strategy, grad, per_token, instrs = compiled
    colls = [i for i in instrs.values() if i.is_collective]
    assert STATE < (T // W) * H * D  # so that "state-sized" is a real distinction here
    if per_token:  # beside the states: the ranks' log-decays [B, H] and one [B] permute of the boundary ids
        small = [c for c in colls if c.size < STATE]
        assert all(c.size <= W * B * H for c in small), [(c.opcode, c.shape) for c in small]
        assert sum(c.opcode == "collective-permute" and c.size == B for c in small) == 1
        states = [c for c in colls if c.size >= STATE]
        if strategy == "allgather":
            assert {c.opcode for c in colls} == {"all-gather", "collective-permute"}
            assert len(states) == (2 if grad else 1) and all(c.size == W * STATE for c in states)
        else:
            assert {c.opcode for c in colls} == {"collective-permute"}
            assert all(c.size == STATE for c in states)
            assert len(states) == (2 if grad else 1) * (W - 1 if strategy == "ring" else 3)
        return
    kinds = {c.opcode for c in colls}
    if strategy == "allgather":
        assert kinds == {"all-gather"}
        assert len(colls) == (2 if grad else 1)
        assert all(c.size == W * STATE for c in colls)
        return
    assert kinds == {"collective-permute"}
    assert all(c.size == STATE for c in colls)
    shifts = []
    for c in colls:
        (shift,) = {t - s for s, t in c.pairs}  # one uniform shift per permute, no wrap-around
        assert len(c.pairs) == W - abs(shift)
        shifts.append(shift)
    if strategy == "ring":
        want = [1] * (W - 1) + ([-1] * (W - 1) if grad else [])
    else:
        want = [1, 2, 4] + ([-1, -2, -4] if grad else [])
    assert sorted(shifts) == sorted(want)


def test_intra_chunk_work_does_not_wait_for_collectives(compiled):
    """No [C, C] intra-chunk product waits for a collective of its own pass: in the forward for none at all; in
    fwd+bwd for none of the backward's (dO itself legitimately depends on the forward's states)."""
    _, grad, _, instrs = compiled
    colls = [i for i in instrs.values() if i.is_collective]
    # JAX's op_name metadata marks the transposed (backward) computation; collectives keep their metadata.
    waited_for = [c.name for c in colls if grad == ("transpose(" in c.attrs)]
    assert waited_for
    root = next(i for i in instrs.values() if i.root)
    after = descendants(instrs, waited_for)
    assert root.name in after  # the result does use those states: the check below can fail
    intra = [i.name for i in instrs.values() if i.dims[-2:] == (C, C) and i.opcode in ("fusion", "dot", "custom-call")]
    assert intra, "no [C, C] intra-chunk products found in the HLO"
    assert [n for n in intra if n in after] == []
