"""Model presets as data: Gemma 2 sizes, T5Gemma encoder-decoder pairs and tiny test sizes.

Sizes follow google-deepmind/gemma (`gemma/gm/nn/_gemma.py`, `gemma/research/t5gemma/config.py`);
vocabulary 256000 as in the Hugging Face checkpoints (Google's Flax tables have 256128 rows, the
last 128 padding). Query scaling is 1/sqrt(head_dim) except 27B (1/sqrt(embed_dim / num_heads)).
"""

from __future__ import annotations

import difflib

import gin

from t5g.errors import InputError
from t5g.model.config import EncoderDecoderConfig, ModelConfig, StackConfig


def _stack(layers, embed, hidden, heads, kv_heads, head_dim, **kw) -> StackConfig:
  return StackConfig(num_layers=layers, embed_dim=embed, hidden_dim=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=head_dim, **kw)


# Decoder-only Gemma 2 stacks (also the halves of the T5Gemma presets).
GEMMA2_STACKS: dict[str, StackConfig] = {
    "s": _stack(8, 512, 1024, 8, 8, 64),
    "b": _stack(12, 768, 2048, 12, 12, 64),
    "l": _stack(24, 1024, 2816, 16, 16, 64),
    "ml": _stack(26, 1152, 6912, 4, 4, 256),
    "xl": _stack(24, 2048, 5120, 32, 32, 64),
    "2b": _stack(26, 2304, 9216, 8, 4, 256),
    "9b": _stack(42, 3584, 14336, 16, 8, 256),
    "27b": _stack(46, 4608, 36864, 32, 16, 128, query_pre_attn_scalar=144),
}

# Tiny sizes for tests and the embedded default run. The window is shorter than the test
# sequences so that local layers matter; GQA and norms/soft-caps are all exercised.
TINY_STACKS: dict[str, StackConfig] = {
    "tiny": _stack(4, 64, 128, 4, 2, 16, vocab_size=512, sliding_window=8),
    "tiny_wide": _stack(3, 96, 160, 4, 1, 24, vocab_size=512, sliding_window=8),
}

GEMMA2_PRESETS: dict[str, StackConfig] = {
    **{f"gemma2-{k}": v for k, v in GEMMA2_STACKS.items()},
    **{f"gemma2-{k}": v for k, v in TINY_STACKS.items()},
}

_PAIRS = {"s-s": ("s", "s"), "b-b": ("b", "b"), "l-l": ("l", "l"), "ml-ml": ("ml", "ml"),
          "xl-xl": ("xl", "xl"), "2b-2b": ("2b", "2b"), "9b-2b": ("9b", "2b"),
          "9b-9b": ("9b", "9b")}
_TINY_PAIRS = {"tiny-tiny": ("tiny", "tiny"), "tiny_wide-tiny": ("tiny_wide", "tiny")}

T5GEMMA_PRESETS: dict[str, EncoderDecoderConfig] = {
    **{f"t5gemma-{k}": EncoderDecoderConfig(GEMMA2_STACKS[e], GEMMA2_STACKS[d])
       for k, (e, d) in _PAIRS.items()},
    **{f"t5gemma-{k}": EncoderDecoderConfig(TINY_STACKS[e], TINY_STACKS[d])
       for k, (e, d) in _TINY_PAIRS.items()},
}

PRESETS: dict[str, ModelConfig] = {**GEMMA2_PRESETS, **T5GEMMA_PRESETS}


def get_preset(name: str) -> ModelConfig:
  """Returns the preset called `name`; an unknown name raises, listing the closest ones."""
  if name in PRESETS:
    return PRESETS[name]
  close = difflib.get_close_matches(name, PRESETS, n=4, cutoff=0.4)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  raise InputError(f"unknown model preset {name!r}.{hint} Known: {', '.join(sorted(PRESETS))}")


gin.external_configurable(get_preset, module="t5g")
