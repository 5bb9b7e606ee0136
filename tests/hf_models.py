"""Tiny random transformers models (the independent references) and how to run them."""

import numpy as np
import torch
import transformers
from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

VOCAB = 512
WINDOW = 8


def _module_fields(layers, hidden, ffn, heads, kv_heads, head_dim):
  return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              head_dim=head_dim, sliding_window=WINDOW, query_pre_attn_scalar=head_dim + 8,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def _spice(model, seed):
  """Random norm scales and larger embeddings/projections, so that soft-caps matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
      elif "q_proj" in name or "k_proj" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
  return model.eval()


def tiny_t5gemma(seed=0):
  """Encoder 3 layers x 96 (1 KV head), decoder 4 layers x 64 (2 KV heads): unbalanced, GQA."""
  torch.manual_seed(seed)
  config = transformers.T5GemmaConfig(
      encoder=T5GemmaModuleConfig(**_module_fields(3, 96, 160, 4, 1, 24)),
      decoder=T5GemmaModuleConfig(**_module_fields(4, 64, 128, 4, 2, 16)),
      vocab_size=VOCAB, attn_implementation="eager")
  return _spice(transformers.T5GemmaForConditionalGeneration(config), seed)


def tiny_gemma2(seed=1):
  """Decoder-only, 5 layers (odd count) x 64, 4 heads over 2 KV heads."""
  torch.manual_seed(seed)
  config = transformers.Gemma2Config(**_module_fields(5, 64, 128, 4, 2, 16),
                                     attn_implementation="eager")
  return _spice(transformers.Gemma2ForCausalLM(config), seed)


def tiny_gemma2_wide(seed=2):
  """Decoder-only, 3 layers x 96, 4 heads over 1 KV head: the encoder side of an unbalanced pair."""
  torch.manual_seed(seed)
  config = transformers.Gemma2Config(**_module_fields(3, 96, 160, 4, 1, 24),
                                     attn_implementation="eager")
  return _spice(transformers.Gemma2ForCausalLM(config), seed)


def tiny_classifier(seed=3, num_labels=3):
  """Encoder-only T5GemmaForSequenceClassification: 3 layers x 64 (2 KV heads), non-zero score
  bias."""
  torch.manual_seed(seed)
  fields = _module_fields(3, 64, 128, 4, 2, 16)
  config = transformers.T5GemmaConfig(
      encoder=T5GemmaModuleConfig(**fields), decoder=T5GemmaModuleConfig(**fields),
      vocab_size=VOCAB, num_labels=num_labels, attn_implementation="eager")
  model = transformers.T5GemmaForSequenceClassification(config, is_encoder_decoder=False)
  with torch.no_grad():
    model.score.out_proj.bias.copy_(torch.randn(num_labels) * 0.5)
  return _spice(model, seed)


def classifier_logits(folder, tokens):
  """transformers class logits [B, C] (numpy) of a classifier folder for right-padded rows."""
  model = transformers.T5GemmaForSequenceClassification.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens),
                 attention_mask=torch.tensor(tokens != 0).long()).logits.numpy()


def load_t5gemma(folder, encoder_window=WINDOW - 1):
  """Loads a T5Gemma folder with eager attention; the encoder window set to W - 1.

  transformers 5.x keeps |q - kv| <= W in the encoder's local layers where Google's reference
  (which t5g follows) keeps |q - kv| < W; W - 1 makes them agree (facts file, top note).
  """
  model = transformers.T5GemmaForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager", dtype=torch.float32).eval()
  model.config.encoder.sliding_window = encoder_window
  for layer in model.model.encoder.layers:
    if getattr(layer.self_attn, "sliding_window", None):
      layer.self_attn.sliding_window = encoder_window
  return model


def t5gemma_logits(model, enc, dec):
  """transformers logits for padded int arrays (padding 0): [B, T, V] numpy."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                decoder_input_ids=torch.tensor(dec),
                decoder_attention_mask=torch.tensor(dec != 0).long())
  return out.logits.numpy()


def gemma2_logits(model, tokens):
  """transformers Gemma 2 logits for right-padded tokens: [B, T, V] numpy."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(tokens != 0).long())
  return out.logits.numpy()


def random_batch(rng, lengths, max_len, first=None):
  """Right-padded random token rows of the given lengths; `first` overrides token 0."""
  rows = np.zeros((len(lengths), max_len), np.int64)
  for i, n in enumerate(lengths):
    rows[i, :n] = rng.randint(3, VOCAB, n)
    if first is not None:
      rows[i, 0] = first
  return rows


def tiny_classifier_checkpoint(directory, seed=0):
  """A random 3-class t5g ClassifierConfig checkpoint (step 0, scanned) in `directory`: encoder
  3 layers x 64 (2 KV heads); every parameter random (norm scales and head bias too, scales as
  in `_spice`), drawn with numpy onto the traced shapes (no init to compile)."""
  import jax

  from t5g.checkpoints import model_dir
  from t5g.model.config import ClassifierConfig, ComputeConfig, StackConfig
  from t5g.model.models import abstract_params

  config = ClassifierConfig(StackConfig(3, 64, 128, 4, 2, 16, vocab_size=VOCAB,
                                        sliding_window=WINDOW, query_pre_attn_scalar=24), 3)
  rng = np.random.RandomState(seed)
  scales = {"scale": 0.5, "bias": 0.5, "embedding": 0.6, "q_proj": 0.25, "k_proj": 0.25}

  def draw(path, x):
    return (rng.normal(size=x.shape) * scales.get(path[-1].key, 0.1)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(
      draw, abstract_params(config, ComputeConfig(scan_layers=True)))
  model_dir.save(directory, 0, params, config, scanned=True)
  return directory
