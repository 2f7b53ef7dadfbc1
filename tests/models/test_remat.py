"""Remat policies and remat_every change what the backward keeps, never the gradients."""

from __future__ import annotations

import functools
import math
import typing
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import lm
from models.config import Remat
from models.documents import document_ids
from tests.models import helpers


@functools.cache
def _reference():
    cfg = helpers.tiny("tnl-tiny-hybrid", n_layers=2)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = (helpers.tokens(rng, t=16), helpers.tokens(rng, t=16), np.ones((2, 16), np.float32))
    return cfg, state, batch, helpers.loss_grads_logits(graphdef)(state, *batch)


@pytest.mark.parametrize("remat", ["block", "block_attention", "full"])
def test_remat_keeps_gradients(remat):
    cfg, state, batch, ((ref_loss, _), ref_grads) = _reference()
    graphdef, _ = nnx.split(models.build_model(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
    run = helpers.loss_grads_logits(graphdef)
    jaxpr = str(run.trace(state, *batch).jaxpr)
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    (loss, _), grads = run(state, *batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert helpers.max_rel(grads, ref_grads) < 1e-5


def test_every_remat_choice_has_a_policy():
    assert set(typing.get_args(Remat)) == {"none", *lm._POLICIES}


def _kernel_model(remat: str):
    """A 2-layer Mamba-2 whose linear attention runs the Triton kernels interpreted: (loss of its state, state)."""
    cfg = helpers.tiny("mamba2-tiny", mlp_hidden=None, head_dim=16, attn_impl="pallas_triton_interpret",
                       remat=remat)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    tok = helpers.tokens(np.random.default_rng(2), t=24)
    seg = jnp.asarray(document_ids(np.asarray(tok.at[:, 9].set(0)), separator=0))
    return _mean_loss(graphdef, tok, seg), state


def test_block_attention_runs_the_attention_forward_once():
    """remat="block_attention" keeps each layer's attention output o [B, T, H, P] and saved states (the per-piece
    states entering the pieces and the end state: vjp.SAVEABLE_NAMES), so XLA drops the rematerialized forward
    kernels: the compiled CPU gradient has as many while loops (each kernel launch lowers to a loop over its grid,
    single-step grids to none) as without remat, measured 7, against block's 9; the gradients are those of no
    remat (measured bit-equal)."""
    loops, residuals, grads = {}, {}, {}
    for remat in ("none", "block", "block_attention"):
        loss, state = _kernel_model(remat)
        compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        loops[remat] = sum(" while(" in line for line in compiled.as_text().splitlines())
        residuals[remat] = Counter(r.shape for r in jax.tree.leaves(jax.eval_shape(lambda s: jax.vjp(loss, s)[1],
                                                                                   state)))
        if remat != "block":
            grads[remat] = compiled(state)
    assert loops["block_attention"] == loops["none"] < loops["block"], loops
    layers = 2
    assert residuals["block_attention"] - residuals["block"] == Counter(
        {(2, 24, 4, 16): layers, (2, 4, 1, 16, 16): layers, (2, 4, 16, 16): layers})  # o, pieces_in, m
    assert helpers.max_rel(grads["block_attention"], grads["none"]) < 1e-6


def test_block_attention_conv_keeps_the_convolution_output():
    """remat="block_attention_conv" keeps each Mamba-2 layer's convolution output [B, T, C] (C = d_inner + 2 G N)
    on top of block_attention's residuals, so the backward does not convolve again (XLA's residuals, from shapes
    only), and the gradients stay block_attention's (measured 9.8e-7 relative: XLA fuses the SiLU otherwise once
    its input is kept)."""
    cfg = helpers.tiny("mamba2-tiny", mlp_hidden=None, head_dim=16)
    tok = helpers.tokens(np.random.default_rng(2), t=16)
    residuals, grads = {}, {}
    for remat in ("block_attention", "block_attention_conv"):
        graphdef, state = nnx.split(models.build_model(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
        loss = _mean_loss(graphdef, tok, None)
        residuals[remat] = Counter(r.shape for r in jax.tree.leaves(jax.eval_shape(lambda s: jax.vjp(loss, s)[1],
                                                                                   state)))
        grads[remat] = helpers.jit(jax.grad(loss))(state)
    channels = cfg.expand * cfg.d_model + 2 * cfg.n_groups * cfg.d_state
    assert residuals["block_attention_conv"] - residuals["block_attention"] == Counter(
        {(*tok.shape, channels): cfg.n_layers})
    assert helpers.max_rel(grads["block_attention_conv"], grads["block_attention"]) < 5e-6


@pytest.mark.parametrize("remat", ["block", "block_attention", "block_attention_conv"])
def test_remat_keeps_the_gated_norms_statistic(remat):
    """The policies that keep the matmuls also keep the gated norm kernels' per-row statistic r
    (gated_norm.STATS_NAME), so the rematerialized backward of a 1-layer Mamba-2 running them interpreted launches
    no forward kernel: its compiled CPU gradient has one gated_norm_forward loop (the forward's), as without remat
    (with dots alone kept, measured: two, with one gated_norm_backward loop each)."""
    cfg = helpers.tiny("mamba2-tiny", n_layers=1, mlp_hidden=None, head_dim=16,
                       mamba2_impl="pallas_triton_interpret", remat=remat)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    loss = _mean_loss(graphdef, helpers.tokens(np.random.default_rng(2), t=16), None)
    loops = [line for line in jax.jit(jax.grad(loss)).lower(state).compile().as_text().splitlines()
             if " while(" in line]  # each kernel launch of a multi-step grid lowers to a loop
    kernels = Counter(name for line in loops for name in ("gated_norm_forward", "gated_norm_backward")
                      if name in line)
    assert kernels == {"gated_norm_forward": cfg.n_layers, "gated_norm_backward": cfg.n_layers}, kernels


def test_norm_kernels_keep_nothing_more():
    """With the SRMSNorm kernels interpreted (srms_norm_residual: each block's norms pass x through), no policy
    keeps a residual that the xla norms do not (XLA's residuals, from shapes only): the passed-through x is the
    block input, kept anyway. Measured: the xla norms keep their [B, T, 1] statistic as well, nothing else differs
    (residuals under every policy as before the residual op, 2026-12-01)."""
    tok = helpers.tokens(np.random.default_rng(2), t=16)
    for remat in ("none", *lm._POLICIES):
        kept = {}
        for impl in ("xla", "pallas_triton_interpret"):
            cfg = helpers.tiny("mamba2-tiny", n_layers=1, head_dim=16, norm_impl=impl, remat=remat)
            graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
            loss = _mean_loss(graphdef, tok, None)
            kept[impl] = Counter(r.shape for r in jax.tree.leaves(jax.eval_shape(lambda s: jax.vjp(loss, s)[1],
                                                                                 state)))
        assert not kept["pallas_triton_interpret"] - kept["xla"], (remat, kept)
        assert set(kept["xla"] - kept["pallas_triton_interpret"]) == {(*tok.shape, 1)}, (remat, kept)


# --- remat_every: runs of blocks recomputed from their first block's input ---
_LAYERS = 5  # divisible by neither 2 nor 3: the last run is shorter


def _mean_loss(graphdef, tok, seg):
    def f(state):
        total, count = nnx.merge(graphdef, state).loss(tok, tok, segment_ids=seg)
        return total / count
    return f


@functools.cache
def _every_reference():
    """5-layer TNL, two documents per row, no remat: (cfg, state, (tokens, segment_ids), loss, grads)."""
    cfg = helpers.tiny("tnl-tiny", n_layers=_LAYERS)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    tok = helpers.tokens(np.random.default_rng(1), t=16)
    tok = tok.at[:, 6].set(0)
    seg = jnp.asarray(document_ids(np.asarray(tok), separator=0))
    loss, grads = helpers.jit(jax.value_and_grad(_mean_loss(graphdef, tok, seg)))(state)
    return cfg, state, (tok, seg), loss, grads


def _saved_activations(cfg, state, tok, seg) -> int:
    """How many [B, T, D] arrays the forward keeps for the backward (jax.vjp's residuals, from shapes only)."""
    graphdef, _ = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    residuals = jax.tree.leaves(jax.eval_shape(lambda s: jax.vjp(_mean_loss(graphdef, tok, seg), s)[1], state))
    return sum(r.shape == (*tok.shape, cfg.d_model) for r in residuals)


@pytest.mark.parametrize("every, remat", [(2, "full"), (3, "block")])
def test_remat_every_keeps_gradients(every, remat):
    cfg, state, (tok, seg), ref_loss, ref_grads = _every_reference()
    cfg = cfg.replace(remat=remat, remat_every=every)
    graphdef, _ = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    loss, grads = helpers.jit(jax.value_and_grad(_mean_loss(graphdef, tok, seg)))(state)
    # measured: loss bit-equal, grads 3.9e-7 (every=2) and 3.5e-7 (every=3) relative
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert helpers.max_rel(grads, ref_grads) < 1e-6
    # the forward keeps one block input per run (whatever the per-block policy keeps inside is recomputed),
    # where remat="full" keeps one per block; the final hidden state is kept by both
    per_block = _saved_activations(cfg.replace(remat="full", remat_every=1), state, tok, seg)
    assert _saved_activations(cfg, state, tok, seg) - per_block == math.ceil(_LAYERS / every) - _LAYERS


def test_remat_every_shrinks_backward_memory():
    """XLA's own buffer plan (compile only): 16 thin layers at T=1024, remat="full". Per block the backward's
    working set is ~22 block inputs' worth (chunk scores and states, projections and their cotangents); every=1
    adds the 16 kept block inputs, every=4 the 4 runs' inputs plus the 3 recomputed inside the run in flight,
    9 inputs fewer: measured 9.50 -> 7.25 MiB (0.763x), exactly 9 x 1024 x 64 x 4 bytes less."""
    t = 1024
    temps = {}
    for every in (1, 4):
        cfg = helpers.tiny("lt-tiny", n_layers=16, d_model=64, n_heads=1, mlp_hidden=0, remat="full", ce_chunk=t,
                           remat_every=every)
        graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
        tok = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def grad(s, tok):
            return jax.grad(_mean_loss(graphdef, tok, None))(s)

        temps[every] = helpers.jit(grad).lower(state, tok).compile().memory_analysis().temp_size_in_bytes
    block_input = t * 64 * 4
    print(f"temp bytes: every=1 {temps[1]}, every=4 {temps[4]} ({temps[4] / temps[1]:.3f}x), "
          f"{(temps[1] - temps[4]) / block_input:.2f} block inputs less")
    assert temps[1] - temps[4] >= 7 * block_input
    assert temps[4] <= 0.85 * temps[1]


def test_remat_every_must_be_positive():
    with pytest.raises(ValueError, match="remat_every must be an int >= 1"):
        models.ModelConfig(remat_every=0)
