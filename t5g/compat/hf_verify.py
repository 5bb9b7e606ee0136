"""Checks a written HF folder by reloading it with `transformers` and comparing logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from t5g.model import layout
from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ClassifierConfig, ComputeConfig,
                              EncoderDecoderConfig, ModelConfig)
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
  Google's (see docs/architecture.md). A classifier's rows are right-padded to different
  lengths (each ending in EOS, as in training), so that the pooled token is checked too.
  """
  import torch
  import transformers

  rng = np.random.RandomState(seed)
  stacks = layout.stacks(config)
  vocab = min(s.vocab_size for s in stacks.values())
  length = min(length, min(s.sliding_window for s in stacks.values()))
  model = make_model(config, ComputeConfig(jnp.float32, jnp.float32, scan_layers=scanned))
  apply = jax.jit(model.apply)  # One compilation rather than one per operation.
  load = dict(dtype=torch.float32, attn_implementation="eager")
  if isinstance(config, ClassifierConfig):
    tokens = _classifier_rows(rng, batch, length, vocab)
    ours = apply({"params": params}, tokens)
    hf = transformers.T5GemmaForSequenceClassification.from_pretrained(folder, **load).eval()
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(tokens),
                  attention_mask=torch.tensor(tokens != PAD_ID).long()).logits
  elif isinstance(config, EncoderDecoderConfig):
    inputs = rng.randint(3, vocab, (batch, length))
    targets = rng.randint(3, vocab, (batch, length))
    targets[:, 0] = BOS_ID
    ours = apply({"params": params}, inputs, targets)
    hf = transformers.T5GemmaForConditionalGeneration.from_pretrained(folder, **load).eval()
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(targets)).logits
  else:
    tokens = rng.randint(3, vocab, (batch, length))
    tokens[:, 0] = BOS_ID
    ours = apply({"params": params}, tokens)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(folder, **load).eval()
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(tokens)).logits
  return float(np.max(np.abs(np.asarray(ours) - theirs.float().numpy())))


def _classifier_rows(rng: np.random.RandomState, batch: int, length: int,
                    vocab: int) -> np.ndarray:
  """Int32 [batch, length] random text tokens + EOS, row i right-padded (with PAD_ID) to
  `length` from length - i * (length // batch) tokens: every row a different length."""
  tokens = np.full((batch, length), PAD_ID, np.int32)
  for i in range(batch):
    n = max(1, length - i * (length // batch))
    tokens[i, :n - 1] = rng.randint(3, vocab, n - 1)
    tokens[i, n - 1] = EOS_ID
  return tokens
