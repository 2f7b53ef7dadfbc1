"""causal_softmax_attention (one device, blockwise) against a float64 dense causal softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.ops import softmax
from lasp_jax.ops.softmax import causal_softmax_attention
from tests.util import BF16_TOL, F32_TOL, dense_causal_softmax, qkv, rel_err


@pytest.mark.parametrize("blocks", [(512, 512), (5, 3)], ids=["one-block", "blocks-5x3"])
def test_one_device_function_matchesdense_causal_softmax(blocks, rng):
    bq, bk = blocks
    q, k, v = qkv(rng, 2, 16, 4, 1, 8, 4)  # MQA, Dv != Dk
    assert rel_err(causal_softmax_attention(q, k, v, block_q=bq, block_k=bk), dense_causal_softmax(q, k, v)) < F32_TOL
    # q_offset: the last 6 rows at positions 10..15 over all 16 keys equal those rows of the full result.
    tail = causal_softmax_attention(q[:, 10:], k, v, q_offset=10, block_q=bq, block_k=bk)
    assert rel_err(tail, dense_causal_softmax(q, k, v)[:, 10:]) < F32_TOL


def test_bf16_inputs(rng):
    """bf16 q, k, v: bf16 products accumulated in fp32 stay within one bf16 rounding of the float64 result."""
    q, k, v = qkv(rng, 2, 24, 4, 2, 16, 16, dtype=jnp.bfloat16)
    o = causal_softmax_attention(q, k, v, block_q=8, block_k=8)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, dense_causal_softmax(*(x.astype(jnp.float32) for x in (q, k, v)))) < BF16_TOL


def test_blockwise_never_holds_the_whole_score_matrix(rng):
    """Neither the forward nor the backward has a value as large as the [H, T, T] scores: one block at most."""
    t, h = 64, 4
    q, k, v = qkv(rng, 1, t, h, h, 8, 8)

    def loss(q, k, v):
        return jnp.sum(causal_softmax_attention(q, k, v, block_q=8, block_k=16))

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for p in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = p.jaxpr if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns") else p
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    biggest = max(sizes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert biggest < h * t * t / 4, biggest


def test_auto_takes_cudnn_only_for_shapes_it_trains(monkeypatch):
    """On a qualified GPU "auto" takes cuDNN without a mask, and with one (documents, a global q_offset) only while
    the dense mask is small and L, S are even (cuDNN refuses an odd length with a bias in training); head dims a
    multiple of 8 up to 256; a decoding step (L = 1) keeps the blockwise loop. Checked on shapes (no GPU here)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *_: [type("Gpu", (), {"device_kind": softmax.CUDNN_QUALIFIED_GPUS[0]})])

    def applies(length, keys, d=128, docs=False, q_offset=0, dtype=jnp.bfloat16):
        q = jax.ShapeDtypeStruct((1, length, 4, d), dtype)
        k = jax.ShapeDtypeStruct((1, keys, 2, d), dtype)
        return softmax._cudnn_applies(q, k, k, jnp.zeros((1, keys), jnp.int32) if docs else None, q_offset)

    assert applies(1023, 1023)  # cuDNN's own causal mask: any length
    assert applies(1024, 1024, docs=True) and applies(512, 1024, q_offset=512)
    assert not applies(1023, 1023, docs=True) and not applies(1, 1024, q_offset=1023)
    assert not applies(32768, 65536, docs=True)  # B * L * S above DENSE_MASK_MAX
    assert not applies(1024, 1024, d=12) and not applies(1024, 1024, d=512)
    assert not applies(1024, 1024, dtype=jnp.float32)
