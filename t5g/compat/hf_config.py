"""Hugging Face `config.json` <-> t5g model configs, for `gemma2` and `t5gemma` folders.

A `t5gemma` folder is an encoder-decoder (`T5GemmaForConditionalGeneration`) or, with
`is_encoder_decoder: false` and the `T5GemmaForSequenceClassification` architecture, t5g's
encoder-only classifier (`ClassifierConfig`). Reading checks every field t5g cannot represent
(another activation, biases, a layer pattern that is not local/global alternation, untied
embeddings, a head other than single-label sequence classification) and names the file and key
at fault. Writing produces a config that `from_pretrained` accepts in transformers 4.53+ and 5.x.
"""

from __future__ import annotations

import json
import os
from typing import Any

from t5g.errors import InputError
from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ClassifierConfig, EncoderDecoderConfig,
                              ModelConfig, StackConfig)

CONFIG_FILE = "config.json"
CLASSIFIER_ARCHITECTURE = "T5GemmaForSequenceClassification"
# Beside `sliding_window` when an export wrote another value (`--hf_sliding_window=match`):
# the window the model computes with in t5g's convention (|q - kv| < W), read back by import.
T5G_WINDOW_KEY = "t5g_sliding_window"
# Heads on a T5Gemma that t5g has no model for (an encoder-decoder classifier, per-token labels).
_UNSUPPORTED_HEADS = (CLASSIFIER_ARCHITECTURE, "T5GemmaForTokenClassification")


def layer_types(cfg: StackConfig) -> list[str]:
  return ["sliding_attention" if cfg.is_local(i) else "full_attention"
          for i in range(cfg.num_layers)]


def _rope_theta(d: dict[str, Any]) -> float:
  params = d.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    if params.get("rope_type", "default") != "default":
      raise InputError(f"rope_parameters.rope_type={params['rope_type']!r} (only 'default')")
    return float(params["rope_theta"])
  return float(d.get("rope_theta", 10000.0))


def stack_from_hf(d: dict[str, Any], where: str) -> StackConfig:
  """A StackConfig from one HF Gemma 2 / T5Gemma module config dict."""
  try:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
      raise InputError(f"hidden_activation={act!r} (t5g implements gelu_pytorch_tanh)")
    if d.get("attention_bias", False):
      raise InputError("attention_bias=true (Gemma 2 has no biases)")
    cfg = StackConfig(
        num_layers=int(d["num_hidden_layers"]), embed_dim=int(d["hidden_size"]),
        hidden_dim=int(d["intermediate_size"]), num_heads=int(d["num_attention_heads"]),
        num_kv_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
        head_dim=int(d["head_dim"]), vocab_size=int(d["vocab_size"]),
        sliding_window=int(d.get(T5G_WINDOW_KEY) or d.get("sliding_window")
                           or d.get("sliding_window_size") or 4096),
        attn_logit_softcap=d.get("attn_logit_softcapping"),
        final_logit_softcap=d.get("final_logit_softcapping"),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"), rope_base=_rope_theta(d),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)))
    types = d.get("layer_types")
    if types is not None and list(types) != layer_types(cfg):
      raise InputError("layer_types is not sliding/full alternation starting with sliding")
  except KeyError as e:
    raise InputError(f"{where}: missing key {e.args[0]!r}") from None
  except (ValueError, TypeError) as e:
    raise InputError(f"{where}: {e}") from None
  return cfg


def read_config(folder: str) -> ModelConfig:
  """The t5g config of a HF `gemma2` or `t5gemma` folder."""
  path = os.path.join(folder, CONFIG_FILE)
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  return config_from_hf(d, path)


def config_from_hf(d: dict[str, Any], path: str) -> ModelConfig:
  """The t5g config of a HF `gemma2` or `t5gemma` config dict read from `path`: a StackConfig,
  an EncoderDecoderConfig, or a ClassifierConfig for an encoder-only sequence classifier."""
  if not isinstance(d, dict):
    raise InputError(f"{path}: expected a JSON object")
  kind = d.get("model_type")
  if kind == "gemma2":
    if d.get("tie_word_embeddings", True) is False:
      raise InputError(f"{path}: tie_word_embeddings=false (Gemma 2 ties the output layer)")
    return stack_from_hf(d, path)
  if kind == "t5gemma":
    architectures = d.get("architectures") or []
    if d.get("is_encoder_decoder", True) is False:
      return _classifier_from_hf(d, architectures, path)
    if d.get("tie_word_embeddings", True) is False:
      raise InputError(f"{path}: tie_word_embeddings=false (T5Gemma ties the decoder output)")
    heads = [a for a in architectures if a in _UNSUPPORTED_HEADS]
    if heads:
      raise InputError(f"{path}: architectures={heads} with is_encoder_decoder=true; t5g's "
                       f"classifier is encoder-only ({CLASSIFIER_ARCHITECTURE} with "
                       "is_encoder_decoder=false)")
    for part in ("encoder", "decoder"):
      if not isinstance(d.get(part), dict):
        raise InputError(f"{path}: missing key {part!r}")
    encoder = stack_from_hf(d["encoder"], f"{path}: encoder")
    decoder = stack_from_hf(d["decoder"], f"{path}: decoder")
    cross = d["decoder"].get("cross_attention_hidden_size", encoder.embed_dim)
    if cross != encoder.embed_dim:
      raise InputError(f"{path}: decoder.cross_attention_hidden_size={cross} != encoder "
                       f"hidden_size={encoder.embed_dim}")
    try:
      return EncoderDecoderConfig(encoder, decoder)
    except ValueError as e:
      raise InputError(f"{path}: {e}") from None
  raise InputError(f"{path}: model_type={kind!r}; t5g reads 'gemma2' and 't5gemma'")


def _classifier_from_hf(d: dict[str, Any], architectures: list, path: str) -> ClassifierConfig:
  """The ClassifierConfig of an encoder-only `t5gemma` config dict (is_encoder_decoder=false)."""
  if architectures != [CLASSIFIER_ARCHITECTURE]:
    raise InputError(f"{path}: is_encoder_decoder=false with architectures={architectures}; "
                     f"t5g reads an encoder-only T5Gemma only as [{CLASSIFIER_ARCHITECTURE!r}] "
                     "(an encoder and a classification head)")
  if d.get("problem_type") not in (None, "single_label_classification"):
    raise InputError(f"{path}: problem_type={d['problem_type']!r}; t5g's classifier is "
                     "single_label_classification (softmax over the classes)")
  if not isinstance(d.get("encoder"), dict):
    raise InputError(f"{path}: missing key 'encoder'")
  pad = d.get("pad_token_id", (d.get("decoder") or {}).get("pad_token_id", PAD_ID))
  if pad != PAD_ID:  # transformers falls back on the decoder's, as here.
    raise InputError(f"{path}: pad_token_id={pad!r}; t5g pools the last token before padding "
                     f"id {PAD_ID}")
  if isinstance(d.get("id2label"), dict):
    num_classes = len(d["id2label"])
  elif "num_labels" in d:
    num_classes = d["num_labels"]
  else:
    raise InputError(f"{path}: missing key 'id2label' (or 'num_labels'): the class count")
  if "num_labels" in d and d["num_labels"] != num_classes:
    raise InputError(f"{path}: num_labels={d['num_labels']!r} != {num_classes} id2label entries")
  encoder = stack_from_hf(d["encoder"], f"{path}: encoder")
  try:
    return ClassifierConfig(encoder, num_classes)
  except ValueError as e:
    raise InputError(f"{path}: {e}") from None


def stack_to_hf(cfg: StackConfig, window: int | None = None) -> dict[str, Any]:
  """The HF module config fields of one stack (Gemma2Config / T5GemmaModuleConfig names).

  window: the `sliding_window` to write (default the stack's); another value is written with
  the stack's own under T5G_WINDOW_KEY.
  """
  window = cfg.sliding_window if window is None else window
  marker = {} if window == cfg.sliding_window else {T5G_WINDOW_KEY: cfg.sliding_window}
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": 8192, "initializer_range": 0.02,
      "rms_norm_eps": cfg.rms_norm_eps, "use_cache": True, "pad_token_id": PAD_ID,
      "eos_token_id": EOS_ID, "bos_token_id": BOS_ID, "tie_word_embeddings": True,
      "rope_theta": cfg.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "attention_bias": False, "attention_dropout": 0.0, "dropout_rate": 0.0,
      "query_pre_attn_scalar": (cfg.head_dim if cfg.query_pre_attn_scalar is None
                                else cfg.query_pre_attn_scalar),
      "sliding_window": window, **marker, "layer_types": layer_types(cfg),
      "final_logit_softcapping": cfg.final_logit_softcap,
      "attn_logit_softcapping": cfg.attn_logit_softcap,
  }


def config_to_hf(config: ModelConfig, torch_dtype: str,
                 windows: dict[str, int] | None = None) -> dict[str, Any]:
  """config.json contents for a Gemma2ForCausalLM, T5GemmaForConditionalGeneration or
  (a classifier) encoder-only T5GemmaForSequenceClassification folder.

  windows: the `sliding_window` to write per stack (layout.stacks names: 'encoder', 'decoder',
  'transformer'); default each stack's own.

  T5GemmaConfig always has a decoder module config; an encoder-only classifier's is a copy of
  its encoder's, which T5GemmaEncoderModel never builds.
  """
  windows = windows or {}
  common = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID,
            "torch_dtype": torch_dtype, "dtype": torch_dtype}
  if isinstance(config, StackConfig):
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
            **stack_to_hf(config, windows.get("transformer")), **common}
  classifier = isinstance(config, ClassifierConfig)
  decoder_stack = config.encoder if classifier else config.decoder
  encoder = {**stack_to_hf(config.encoder, windows.get("encoder")),
             "model_type": "t5_gemma_module", "is_decoder": False}
  decoder = {**stack_to_hf(decoder_stack, windows.get("encoder" if classifier else "decoder")),
             "model_type": "t5_gemma_module",
             "is_decoder": True, "cross_attention_hidden_size": config.encoder.embed_dim}
  out = {"architectures": ["T5GemmaForConditionalGeneration"], "model_type": "t5gemma",
         "encoder": encoder, "decoder": decoder, "is_encoder_decoder": True,
         "vocab_size": decoder_stack.vocab_size, "tie_word_embeddings": True,
         "dropout_rate": 0.0, "attention_dropout": 0.0, "classifier_dropout_rate": 0.0,
         "use_cache": True, "initializer_range": 0.02, **common}
  if classifier:
    labels = [f"LABEL_{i}" for i in range(config.num_classes)]
    out.update(architectures=[CLASSIFIER_ARCHITECTURE], is_encoder_decoder=False,
               use_cache=False, problem_type="single_label_classification",
               num_labels=config.num_classes, id2label=dict(enumerate(labels)),
               label2id={name: i for i, name in enumerate(labels)})
  return out
