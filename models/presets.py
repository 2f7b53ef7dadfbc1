"""Named model sizes: the LASP papers' and tiny CPU ones (`python -m models.presets` lists them with sizes).

TNL sizes follow TransNormerLLM (Qin et al. 2023): 385M ("0.4B"): 24 layers, d 1024, 8 heads, SGLU 2816;
1B: 16 layers, d 2048, 16 heads, SGLU 5632; 7B: 30 layers, d 4096, 32 heads, SGLU 11008; vocabulary 64000,
tied embeddings. The Linear Transformer ("lt-*") uses the same shapes with its own token mixer. Hybrids
("*-hybrid") make every 4th layer softmax attention (LASP-2H) with GQA (a quarter of the heads as K/V heads),
which keeps the K/V all-gather over the seq axis small.

Mamba-2 sizes follow the Mamba-2 paper's released models (Dao and Gu 2024): 130M: 24 layers, d 768; 370M: 48,
1024; 780M: 48, 1536; 1.3B: 48, 2048; 2.7B: 64, 2560; vocabulary 50280 (GPT-NeoX's, padded), d_state 128, head
dim 64, expand 2, one group, convolution width 4, tied embeddings, no embedding scale, blocks without MLP. Their
softmax layers (hybrids, "mamba2-*-hybrid": every 8th layer, as the paper's hybrids hold about a tenth of attention
layers) have d / 64 heads of 64 and a quarter as many K/V heads.
`tests/models/test_configs.py` checks each name against its parameter count.
"""

from __future__ import annotations

from models.config import ModelConfig

_TNL_04B = ModelConfig(kind="tnl", vocab_size=64000, d_model=1024, n_layers=24, n_heads=8, mlp_hidden=2816)
_TNL_1B = ModelConfig(kind="tnl", vocab_size=64000, d_model=2048, n_layers=16, n_heads=16, mlp_hidden=5632)
_TNL_7B = ModelConfig(kind="tnl", vocab_size=64000, d_model=4096, n_layers=30, n_heads=32, mlp_hidden=11008,
                      dtype="bfloat16", remat="full")
_TINY = ModelConfig(kind="tnl", vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, ce_chunk=64)


def _mamba2(n_layers: int, d_model: int) -> ModelConfig:
    return ModelConfig(kind="mamba2", vocab_size=50280, d_model=d_model, n_layers=n_layers, n_heads=d_model // 64,
                       d_state=128, expand=2, n_groups=1, conv_width=4, scale_embedding=False)


_MAMBA2_TINY = ModelConfig(kind="mamba2", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_state=16, n_groups=2,
                           scale_embedding=False, ce_chunk=64)


def _hybrid(cfg: ModelConfig, every: int = 4) -> ModelConfig:
    return cfg.replace(softmax_layers=every, softmax_kv_heads=max(1, cfg.n_heads // 4))


PRESETS: dict[str, ModelConfig] = {
    "tnl-tiny": _TINY,
    "tnl-0.4b": _TNL_04B,
    "tnl-1b": _TNL_1B,
    "tnl-7b": _TNL_7B,
    "lt-tiny": _TINY.replace(kind="linear_transformer"),
    "lt-0.4b": _TNL_04B.replace(kind="linear_transformer"),
    "lt-1b": _TNL_1B.replace(kind="linear_transformer"),
    "tnl-tiny-hybrid": _hybrid(_TINY, every=2),
    "tnl-0.4b-hybrid": _hybrid(_TNL_04B),
    "tnl-1b-hybrid": _hybrid(_TNL_1B),
    "tnl-7b-hybrid": _hybrid(_TNL_7B),
    "lt-1b-hybrid": _hybrid(_TNL_1B.replace(kind="linear_transformer")),
    "mamba2-tiny": _MAMBA2_TINY,
    "mamba2-130m": _mamba2(24, 768),
    "mamba2-370m": _mamba2(48, 1024),
    "mamba2-780m": _mamba2(48, 1536),
    "mamba2-1.3b": _mamba2(48, 2048),
    "mamba2-2.7b": _mamba2(64, 2560),
    "mamba2-tiny-hybrid": _hybrid(_MAMBA2_TINY, every=2),
    "mamba2-1.3b-hybrid": _hybrid(_mamba2(48, 2048), every=8),
    "mamba2-2.7b-hybrid": _hybrid(_mamba2(64, 2560), every=8),
}


def get(name: str) -> ModelConfig:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


if __name__ == "__main__":
    from models import count_params

    for name, cfg in PRESETS.items():
        print(f"{name:18s} {count_params(cfg):>15,d} parameters  ({cfg.kind}, {cfg.n_layers} layers, d {cfg.d_model}, "
              f"softmax layers {sorted(cfg.softmax_set) or 'none'})")
