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
