"""What crosses devices, read off the compiled HLO: only d_k x d_v states, in the pattern of each strategy, and
never on the path of the intra-chunk work (so the collective can overlap it)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import xla
from tests.parallel.hlo import descendants, entry_instructions

W = 8
B, H, D = 1, 2, 8
C = xla.DEFAULT.chunk_size
T = W * 2 * C  # two chunks per rank
STATE = B * H * D * D


def _compile(strategy: str, grad: bool) -> str:
    mesh = jax.make_mesh((1, W), ("data", "seq"))
    s = jnp.asarray([0.1, 0.5])

    def f(q, k, v):
        return lasp_jax.lasp_attention(q, k, v, s, strategy=strategy, impl="xla")

    if grad:
        f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((B, T, H, D)), NamedSharding(mesh, P("data", "seq")))
        return jax.jit(f).lower(x, x, x).compile().as_text()


@pytest.fixture(scope="module", params=[(s, g) for s in ("ring", "allgather", "scan") for g in (False, True)],
                ids=lambda p: f"{p[0]}-{'fwd+bwd' if p[1] else 'fwd'}")
def compiled(request):
    strategy, grad = request.param
    return strategy, grad, entry_instructions(_compile(strategy, grad))


def test_expected_collectives_and_nothing_that_grows_with_T(compiled):
    strategy, grad, instrs = compiled
    colls = [i for i in instrs.values() if i.is_collective]
    assert STATE < (T // W) * H * D  # so that "state-sized" is a real distinction here
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
    _, grad, instrs = compiled
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
