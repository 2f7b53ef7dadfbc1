"""CPU demo of lasp_attention: every strategy on an 8-device CPU mesh (data=2 x seq=4), checked against the
single-device result, forward and backward, with timings.

    python -m benchmarks.strategies_cpu [--batch 2] [--seq 4096] [--heads 4] [--dim 32] [--repeats 5]

CPU timings show the machinery works and what it costs here; GPU numbers live in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lasp_jax  # noqa: E402
from benchmarks.measure import median_ms, rel_err  # noqa: E402
from lasp_jax.ops import tnl_slopes  # noqa: E402
from lasp_jax.parallel import STRATEGIES  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", 8)

    b, t, h, d = args.batch, args.seq, args.heads, args.dim
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32) / np.sqrt(d) for kk in keys[:3])
    w = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    decay = jnp.asarray(tnl_slopes(h))

    def fwd_bwd(attn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2)))

    single = lambda q, k, v: lasp_jax.linear_attention(q, k, v, decay)  # noqa: E731
    o_ref = jax.jit(single)(q, k, v)
    _, g_ref = fwd_bwd(single)(q, k, v)
    print(f"B={b} T={t} H={h} d={d}, float32, {jax.device_count()} {jax.default_backend()} devices")
    print(f"{'run':<26}{'fwd ms':>10}{'fwd+bwd ms':>12}{'max rel err (o, dq, dk, dv)':>30}")
    print(f"{'1 device, linear_attention':<26}{median_ms(jax.jit(single), (q, k, v), 1, args.repeats):>10.1f}"
          f"{median_ms(fwd_bwd(single), (q, k, v), 1, args.repeats):>12.1f}{'(reference point)':>30}")

    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    worst = 0.0
    with jax.set_mesh(mesh):
        qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, P("data", "seq"))) for x in (q, k, v))
        for strategy in STRATEGIES:
            sharded = lambda q, k, v, s=strategy: lasp_jax.lasp_attention(q, k, v, decay, strategy=s)  # noqa: E731
            o = jax.jit(sharded)(qs, ks, vs)
            _, grads = fwd_bwd(sharded)(qs, ks, vs)
            err = max([rel_err(o, o_ref)] + [rel_err(g, gr) for g, gr in zip(grads, g_ref)])
            worst = max(worst, err)
            label = "data=2 x seq=4, " + strategy
            print(f"{label:<26}{median_ms(jax.jit(sharded), (qs, ks, vs), 1, args.repeats):>10.1f}"
                  f"{median_ms(fwd_bwd(sharded), (qs, ks, vs), 1, args.repeats):>12.1f}{err:>30.2e}")
    if worst > 1e-4:
        raise SystemExit(f"FAILED: a strategy differs from the single-device result by {worst:.2e}")
    print(f"all strategies match the single-device result (worst relative error {worst:.1e})")


if __name__ == "__main__":
    main()
