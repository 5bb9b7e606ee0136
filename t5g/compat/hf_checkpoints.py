"""Read and write Hugging Face `Gemma2ForCausalLM` / `T5GemmaForConditionalGeneration` folders,
and encoder-only `T5GemmaForSequenceClassification` folders for t5g's classifier.

Tensor names and shapes: ../shared/reference/t5gemma-facts.md §2.3, §2.5. HF linear weights are
[out, in]; t5g kernels are [in, out] with heads split out ([D, N, H] for q/k/v, [N, H, D] for o).
The classifier's encoder is named as in T5Gemma (`model.encoder.*`, the T5GemmaEncoderModel
inside the HF classifier) and its head is `score.out_proj.{weight [C, D], bias [C]}`.
Reading maps the safetensors files and fills preallocated arrays tensor by tensor; writing
converts and writes one tensor at a time into a temporary folder that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator

import numpy as np

from t5g.checkpoints.sources import ParamSource, materialize
from t5g.compat import hf_config, safetensors_io
from t5g.errors import ExistingFileError, InputError
from t5g.model import layout
from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ClassifierConfig, ComputeConfig,
                              EncoderDecoderConfig, ModelConfig, model_type)
from t5g.model.models import abstract_params

TOKENIZER_FILE = "tokenizer.model"  # The SentencePiece model in a HF folder, when it has one.

# Layer tensors: (HF name inside a layer, t5g sub-path, conversion kind).
_ATTN = [("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("o_proj", "out")]
_MLP = [("mlp.gate_proj", ("mlp", "gate_proj"), "transpose"),
        ("mlp.up_proj", ("mlp", "up_proj"), "transpose"),
        ("mlp.down_proj", ("mlp", "down_proj"), "transpose")]
_GEMMA2_NORMS = [("input_layernorm", "pre_attention_norm"),
                 ("post_attention_layernorm", "post_attention_norm")]
_T5GEMMA_NORMS = [("pre_self_attn_layernorm", "pre_attention_norm"),
                  ("post_self_attn_layernorm", "post_attention_norm")]
_CROSS_NORMS = [("pre_cross_attn_layernorm", "pre_cross_attention_norm"),
                ("post_cross_attn_layernorm", "post_cross_attention_norm")]
_FFW_NORMS = [("pre_feedforward_layernorm", "pre_ffw_norm"),
              ("post_feedforward_layernorm", "post_ffw_norm")]
# Keys a folder may hold that t5g derives instead (the tied output layer; a classifier has none).
_TIED_HEADS = {"gemma2": "lm_head.weight", "t5gemma": "lm_head.out_proj.weight"}
# The classifier head: (HF name, t5g sub-path under `head`, conversion kind).
_SCORE = [("score.out_proj.weight", ("kernel",), "transpose"),
          ("score.out_proj.bias", ("bias",), "copy")]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor and the t5g parameter it holds."""

  hf_key: str
  stack: str
  layer: int | None
  sub: tuple[str, ...]
  kind: str  # 'copy', 'transpose', 'qkv' ([D,N,H] <-> [N*H,D]) or 'out' ([N,H,D] <-> [D,N*H]).


def tensor_maps(config: ModelConfig) -> Iterator[TensorMap]:
  """Every HF tensor of a model with `config`, in HF's order."""
  t5 = isinstance(config, (EncoderDecoderConfig, ClassifierConfig))
  for stack, cfg in layout.stacks(config).items():
    prefix = f"model.{stack}." if t5 else "model."
    yield TensorMap(f"{prefix}embed_tokens.weight", stack, None, ("embedder", "embedding"),
                    "copy")
    for i in range(cfg.num_layers):
      lp = f"{prefix}layers.{i}."
      attention = [("self_attn", "attn")] + ([("cross_attn", "cross_attn")]
                                             if stack == "decoder" else [])
      for hf_block, block in attention:
        for name, kind in _ATTN:
          yield TensorMap(f"{lp}{hf_block}.{name}.weight", stack, i, (block, name), kind)
      norms = (_T5GEMMA_NORMS + (_CROSS_NORMS if stack == "decoder" else []) if t5
               else _GEMMA2_NORMS) + _FFW_NORMS
      for hf_name, name in norms:
        yield TensorMap(f"{lp}{hf_name}.weight", stack, i, (name, "scale"), "copy")
      for hf_name, sub, kind in _MLP:
        yield TensorMap(f"{lp}{hf_name}.weight", stack, i, sub, kind)
    yield TensorMap(f"{prefix}norm.weight", stack, None, ("final_norm", "scale"), "copy")
  if isinstance(config, ClassifierConfig):
    for hf_key, sub, kind in _SCORE:
      yield TensorMap(hf_key, "head", None, sub, kind)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """t5g array -> HF tensor."""
  if kind == "copy":
    return x
  if kind == "transpose":
    return x.T
  if kind == "qkv":
    return x.reshape(x.shape[0], -1).T
  return x.reshape(-1, x.shape[-1]).T  # 'out'


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of a t5g parameter of `shape`."""
  if kind == "copy":
    return tuple(shape)
  if kind == "transpose":
    return tuple(shape[::-1])
  if kind == "qkv":
    return (int(np.prod(shape[1:])), shape[0])
  return (shape[-1], int(np.prod(shape[:-1])))


def from_hf(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> t5g array of `shape`."""
  if kind == "copy":
    return w
  return w.T.reshape(shape)


def is_hf_folder(folder: str) -> bool:
  """Whether `folder` looks like a HF model folder (config.json and safetensors)."""
  return os.path.exists(os.path.join(folder, hf_config.CONFIG_FILE)) and (
      os.path.exists(os.path.join(folder, safetensors_io.SINGLE_FILE))
      or os.path.exists(os.path.join(folder, safetensors_io.INDEX_FILE)))


class HFSource(ParamSource):
  """A HF folder's tensors as t5g parameters, read one tensor at a time.

  Opening checks the tensor names and shapes against config.json (missing or unexpected keys,
  an untied output layer) from the file headers, before any tensor data is read.
  """

  def __init__(self, folder: str):
    self.where = folder
    self.config = hf_config.read_config(folder)
    self._tensors = safetensors_io.SafetensorsFolder(folder)
    self._maps = {(m.stack, m.layer, m.sub): m for m in tensor_maps(self.config)}
    names = set(self._tensors.keys())
    for m in self._maps.values():
      if m.hf_key not in names:
        raise InputError(f"{folder}: missing tensor {m.hf_key!r}")
    known = {m.hf_key for m in self._maps.values()}
    head = _TIED_HEADS.get(model_type(self.config))
    for key in sorted(names - known):
      if key != head:
        raise InputError(f"{folder}: unexpected tensor {key!r} for a "
                         f"{model_type(self.config)} model")
      embed_key = next(m.hf_key for m in self._maps.values()
                       if m.stack != "encoder" and m.sub == ("embedder", "embedding"))
      if not np.array_equal(self._tensors.get(key), self._tensors.get(embed_key)):
        raise InputError(f"{folder}: {key!r} differs from {embed_key!r}; t5g ties them")
    self._shapes = {}
    for m, shape in _unscanned_shapes(self.config):
      expected, found = hf_shape(m.kind, shape), self._tensors.shape(m.hf_key)
      if found != expected:
        raise InputError(f"{folder}: tensor {m.hf_key!r} has shape {found}, config.json "
                         f"implies {expected}")
      self._shapes[(m.stack, m.layer, m.sub)] = shape

  def get(self, stack: str, layer: int | None, sub: tuple[str, ...]) -> np.ndarray:
    """See base class (shapes were checked when the source was opened)."""
    m = self._maps[(stack, layer, sub)]
    return from_hf(m.kind, self._tensors.get(m.hf_key), self._shapes[(stack, layer, sub)])


def _unscanned_shapes(config: ModelConfig):
  """(TensorMap, t5g shape) for every tensor of `config`."""
  abstract = abstract_params(config, ComputeConfig(scan_layers=False))
  for m in tensor_maps(config):
    yield m, tuple(layout.get(abstract, config, False, m.stack, m.layer, m.sub).shape)


def load(folder: str, scanned: bool) -> tuple[ModelConfig, dict]:
  """Reads a whole HF folder into (config, numpy params in the requested layout)."""
  source = HFSource(folder)
  return source.config, materialize(source, scanned)


def save(folder: str, source: ParamSource, dtype: str = "float32",
         max_shard_bytes: int = 5 << 30, tokenizer: str | None = None,
         windows: dict[str, int] | None = None) -> None:
  """Writes a HF folder (config.json, generation_config.json but for a classifier, which does
  not generate, and safetensors) atomically.

  Tensors are read from `source` and written one at a time. dtype: 'float32' or 'bfloat16'.
  tokenizer: a SentencePiece model file, copied in as tokenizer.model. windows: the
  `sliding_window` per stack in config.json (hf_config.config_to_hf). Refuses to overwrite a
  non-empty `folder`.
  """
  config = source.config
  np_dtype = {"float32": np.dtype(np.float32),
              "bfloat16": safetensors_io.DTYPES["BF16"]}.get(dtype)
  if np_dtype is None:
    raise InputError(f"--dtype={dtype!r}: choose float32 or bfloat16")
  if os.path.exists(folder) and os.listdir(folder):
    raise ExistingFileError(f"{folder}: output folder exists and is not empty")
  maps = {m.hf_key: m for m in tensor_maps(config)}
  shapes = {(m.stack, m.layer, m.sub): (m, shape) for m, shape in _unscanned_shapes(config)}
  plan = [(m.hf_key, hf_shape(m.kind, shape), np_dtype)
          for m, shape in (shapes[name] for name in source.read_order(shapes))]

  def produce(key: str) -> np.ndarray:
    m = maps[key]
    return to_hf(m.kind, source.get(m.stack, m.layer, m.sub)).astype(np_dtype)

  tmp = f"{folder.rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    safetensors_io.write_folder(tmp, plan, produce, max_shard_bytes)
    if tokenizer is not None:
      shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER_FILE))
    with open(os.path.join(tmp, hf_config.CONFIG_FILE), "w") as f:
      json.dump(hf_config.config_to_hf(config, dtype, windows), f, indent=2)
    if not isinstance(config, ClassifierConfig):
      generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
      if isinstance(config, EncoderDecoderConfig):
        generation["decoder_start_token_id"] = BOS_ID
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if os.path.exists(folder):
      os.rmdir(folder)  # Empty, checked above.
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
