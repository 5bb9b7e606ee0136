"""Checks a written HF folder by reloading it with `transformers` and comparing logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t5g.model import layout
from t5g.model.config import BOS_ID, ComputeConfig, EncoderDecoderConfig, ModelConfig
from t5g.model.models import make_model


def transformers_available() -> bool:
  """Whether transformers and torch can be imported."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def max_logit_difference(folder: str, params, config: ModelConfig, scanned: bool,
                         seed: int = 0, batch: int = 2, length: int = 16) -> float:
  """Max |t5g logits - transformers logits| on random tokens, both in float32.

  t5g runs on `params` as stored in `folder` (i.e. already rounded to the export dtype).
  Inputs are shorter than the local window, where transformers' encoder window agrees with
  Google's (see docs/architecture.md).
  """
  import torch
  import transformers

  rng = np.random.RandomState(seed)
  vocab = config.vocab_size
  length = min(length, min(s.sliding_window for s in layout.stacks(config).values()))
  model = make_model(config, ComputeConfig(jnp.float32, jnp.float32, scan_layers=scanned))
  if isinstance(config, EncoderDecoderConfig):
    inputs = rng.randint(3, vocab, (batch, length))
    targets = rng.randint(3, vocab, (batch, length))
    targets[:, 0] = BOS_ID
    ours = model.apply({"params": params}, inputs, targets)
    hf = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(targets)).logits
  else:
    tokens = rng.randint(3, vocab, (batch, length))
    tokens[:, 0] = BOS_ID
    ours = model.apply({"params": params}, tokens)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(tokens)).logits
  return float(np.max(np.abs(np.asarray(ours) - theirs.float().numpy())))

