"""Checks a written HF folder by reloading it with `transformers` and comparing logits.

The local (sliding-window) layers are where t5g and transformers can disagree: t5g keeps keys
with |q - kv| < W (Google's reference), transformers 4.x does the same, transformers 5.x keeps
|q - kv| <= W in the bidirectional encoder (its causal layers keep q - kv < W).
`window_offsets` measures the installed version's convention on a tiny model, and
`verify_export` compares the real folder on padded rows longer than every local window, where
such a difference shows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t5g.model import layout
from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ClassifierConfig, ComputeConfig,
                              EncoderDecoderConfig, ModelConfig)
from t5g.model.models import make_model

_PROBE_WINDOW, _PROBE_LENGTH = 2, 6


def transformers_available() -> bool:
  """Whether transformers and torch can be imported."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def transformers_version() -> str:
  """The installed transformers' version string."""
  import transformers
  return transformers.__version__


def window_offsets(config: ModelConfig) -> dict[str, int]:
  """Per stack of `config` (layout.stacks names): how many more keys on each side the installed
  transformers' local layers keep than t5g's with the same `sliding_window` (0: they agree;
  transformers 5.x gives 1 for an encoder).

  Measured on a random one-layer model of the exported architecture with window 2 and 6
  tokens: the largest |q - kv| with a non-zero attention weight, against t5g's W - 1.
  """
  import torch
  import transformers
  from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

  fields = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                sliding_window=_PROBE_WINDOW, layer_types=["sliding_attention"])
  tokens = torch.arange(3, 3 + _PROBE_LENGTH)[None]
  torch.manual_seed(0)
  with torch.no_grad():
    if isinstance(config, (EncoderDecoderConfig, ClassifierConfig)):
      module = T5GemmaModuleConfig(**fields)
      hf = transformers.T5GemmaForConditionalGeneration(transformers.T5GemmaConfig(
          encoder=module, decoder=module, vocab_size=16, attn_implementation="eager")).eval()
      out = hf(input_ids=tokens, decoder_input_ids=tokens, output_attentions=True)
      weights = {"encoder": out.encoder_attentions[0], "decoder": out.decoder_attentions[0]}
    else:
      hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
          **fields, attn_implementation="eager")).eval()
      weights = {"transformer": hf(input_ids=tokens, output_attentions=True).attentions[0]}
  distance = np.abs(np.arange(_PROBE_LENGTH)[:, None] - np.arange(_PROBE_LENGTH)[None, :])
  return {name: int(distance[weights[name][0, 0].numpy() > 0].max()) - (_PROBE_WINDOW - 1)
          for name in layout.stacks(config)}


@dataclasses.dataclass(frozen=True)
class Verification:
  """What `verify_export` measured (lengths per stack name, in tokens).

  windows: t5g's local window per stack. effective: the window, in t5g's convention, that the
  installed transformers applies with the folder's `sliding_window`. checked: the longest row
  per stack where both should agree, and difference: the max |logit difference| there.
  beyond, beyond_difference: rows longer than the windows of the stacks whose effective window
  differs, and the difference measured on them (None when every window agrees, or when
  max_length left nothing longer to measure).
  """

  windows: dict[str, int]
  effective: dict[str, int]
  checked: dict[str, int]
  difference: float
  beyond: dict[str, int] | None = None
  beyond_difference: float | None = None

  @property
  def diverging(self) -> list[str]:
    """The stacks whose effective window in transformers is not t5g's."""
    return [s for s in self.windows if self.effective[s] != self.windows[s]]

  def past_windows(self) -> bool:
    """Whether the agreeing rows were longer than every window they test."""
    return all(self.checked[s] > self.windows[s] for s in self.windows if s not in self.diverging)


def verify_export(folder: str, params, config: ModelConfig, scanned: bool,
                  written: dict[str, int], offsets: dict[str, int],
                  max_length: int | None = None, seed: int = 0) -> Verification:
  """Compares t5g's and transformers' float32 logits of the HF `folder`.

  params: t5g's, as stored in `folder` (i.e. already rounded to the export dtype). written: the
  `sliding_window` per stack in the folder's config.json; offsets: `window_offsets(config)`.
  Rows go past each window by 2 tokens (distances W and W + 1, where the conventions can
  differ) where transformers' effective window is t5g's, and up to the smaller of the two where
  it is not; those stacks are then also measured past both. max_length (None: unbounded)
  bounds every row: past a window of 4096 the check costs minutes of CPU time and gigabytes of
  logits (docs/architecture.md). Two rows per batch, the second right-padded.
  """
  windows = {s: c.sliding_window for s, c in layout.stacks(config).items()}
  effective = {s: written[s] + offsets[s] for s in windows}

  def bounded(lengths):
    return {s: n if max_length is None else min(n, max_length) for s, n in lengths.items()}

  checked = bounded({s: windows[s] + 2 if effective[s] == windows[s]
                     else min(effective[s], windows[s]) for s in windows})
  compare = _Comparison(folder, params, config, scanned, np.random.RandomState(seed))
  difference = compare(checked)
  if all(effective[s] == windows[s] for s in windows):
    return Verification(windows, effective, checked, difference)
  beyond = bounded({s: max(effective[s], windows[s]) + 1 if effective[s] != windows[s]
                    else checked[s] for s in windows})
  if all(beyond[s] <= checked[s] for s in windows):  # max_length: nothing longer to measure.
    return Verification(windows, effective, checked, difference)
  return Verification(windows, effective, checked, difference, beyond, compare(beyond))


class _Comparison:
  """Max |t5g - transformers| logits of one folder on random right-padded rows."""

  def __init__(self, folder: str, params, config: ModelConfig, scanned: bool,
               rng: np.random.RandomState):
    import torch
    import transformers

    self.params, self.config, self.rng, self.torch = params, config, rng, torch
    self.vocab = min(s.vocab_size for s in layout.stacks(config).values())
    model = make_model(config, ComputeConfig(jnp.float32, jnp.float32, scan_layers=scanned))
    self.apply = jax.jit(model.apply)  # One compilation per shape, not one per operation.
    cls = (transformers.T5GemmaForSequenceClassification if isinstance(config, ClassifierConfig)
           else transformers.T5GemmaForConditionalGeneration
           if isinstance(config, EncoderDecoderConfig) else transformers.Gemma2ForCausalLM)
    self.hf = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

  def __call__(self, lengths: dict[str, int]) -> float:
    torch, apply, params = self.torch, self.apply, {"params": self.params}
    with torch.no_grad():
      if isinstance(self.config, ClassifierConfig):
        tokens = self._rows(lengths["encoder"], eos=True)
        return _max_difference(
            apply(params, tokens),
            self.hf(input_ids=torch.tensor(tokens), attention_mask=_mask(torch, tokens)).logits)
      if isinstance(self.config, EncoderDecoderConfig):
        inputs = self._rows(lengths["encoder"])
        targets = self._rows(lengths["decoder"], first=BOS_ID)
        theirs = self.hf(input_ids=torch.tensor(inputs), attention_mask=_mask(torch, inputs),
                         decoder_input_ids=torch.tensor(targets),
                         decoder_attention_mask=_mask(torch, targets)).logits
        return _max_difference(apply(params, inputs, targets), theirs, targets != PAD_ID)
      tokens = self._rows(lengths["transformer"], first=BOS_ID)
      theirs = self.hf(input_ids=torch.tensor(tokens), attention_mask=_mask(torch, tokens)).logits
      return _max_difference(apply(params, tokens), theirs, tokens != PAD_ID)

  def _rows(self, length: int, first: int | None = None, eos: bool = False) -> np.ndarray:
    """Int32 [2, length]: random text tokens, the second row right-padded (PAD_ID) from half
    the length; `first` replaces each row's first token, `eos` its last (a classifier's)."""
    tokens = np.full((2, length), PAD_ID, np.int32)
    for i, n in enumerate((length, max(1, length // 2))):
      tokens[i, :n] = self.rng.randint(3, self.vocab, n)
      if first is not None:
        tokens[i, 0] = first
      if eos:
        tokens[i, n - 1] = EOS_ID
    return tokens


def _mask(torch, tokens: np.ndarray):
  return torch.tensor(tokens != PAD_ID).long()


def _max_difference(ours, theirs, valid: np.ndarray | None = None) -> float:
  """Max |ours - theirs| over the `valid` [B, T] positions (all when None)."""
  diff = np.abs(np.asarray(ours, np.float32) - theirs.float().numpy())
  return float(diff[valid].max() if valid is not None else diff.max())
