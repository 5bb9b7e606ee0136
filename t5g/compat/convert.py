"""`t5g import`, `t5g export` and `t5g adapt`: any supported checkpoint in, t5g or HF out.

Formats are detected from the path: a Hugging Face folder (config.json + safetensors), a t5g
checkpoint directory, or a Google Flax/Orbax checkpoint (FLAT or NESTED). Every conversion is a
`ParamSource` written lazily, one tensor group at a time, so no whole model is held in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from t5g.checkpoints import lazy, model_dir
from t5g.checkpoints.adapt import AdaptedSource
from t5g.checkpoints.sources import ModelDirSource, ParamSource, TreeSource, materialize
from t5g.compat import google_checkpoint, hf_checkpoints, hf_config, hf_verify
from t5g.errors import ExistingFileError, InputError, MissingFileError
from t5g.model.config import ModelConfig, config_from_json
from t5g.model.presets import PRESETS, get_preset

# Max |logit difference| accepted by the export check (float32 math on identical weights).
VERIFY_TOLERANCE = 1e-3


def release_freed_tensors() -> None:
  """Makes glibc return every freed buffer over 1 MiB to the system at once.

  glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB), and
  later tensors of that size are carved from heap arenas that stay resident: a streamed
  conversion would then grow towards the checkpoint's size. No-op without glibc.
  """
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is not None and hasattr(libc, "mallopt"):
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also fixes the threshold.


def detect(path: str) -> str:
  """'hf', 't5g' or 'google'; anything else raises an error naming `path`."""
  if not os.path.exists(path):
    raise MissingFileError(f"{path}: does not exist")
  if hf_checkpoints.is_hf_folder(path):
    return "hf"
  if model_dir.is_model_dir(path):
    return "t5g"
  if google_checkpoint.is_google_checkpoint(path):
    return "google"
  raise InputError(f"{path}: neither a Hugging Face folder (config.json + model.safetensors "
                   "or model.safetensors.index.json), a t5g checkpoint directory, nor a Google "
                   "Flax/Orbax checkpoint (_METADATA)")


def config_from_arg(value: str) -> ModelConfig:
  """A config from a preset name, a t5g config JSON file or a HF config.json file."""
  if value in PRESETS:
    return PRESETS[value]
  if not os.path.exists(value):
    if "/" in value or value.endswith(".json"):
      raise MissingFileError(f"config {value}: does not exist")
    return get_preset(value)  # Raises, naming the closest presets.
  try:
    with open(value) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"config {value}: not a JSON file ({e})") from None
  if isinstance(d, dict) and ("hidden_size" in d or "encoder" in d and "hidden_size" in
                              d.get("encoder", {})):
    return hf_config.config_from_hf(d, value)
  return config_from_json(d, where=value)


def open_source(path: str, config: ModelConfig | None = None,
                step: int | None = None) -> ParamSource:
  """A ParamSource over any supported checkpoint at `path`.

  config: needed only for Google checkpoints whose sizes match no preset (HF and t5g
  checkpoints carry theirs; a given config must then agree). step: for t5g directories.
  """
  kind = detect(path)
  if kind == "google":
    return google_checkpoint.open_google(path, config)
  source = hf_checkpoints.HFSource(path) if kind == "hf" else ModelDirSource(path, step)
  if config is not None and config != source.config:
    source.close()
    raise InputError(f"{path}: its config differs from the one given: {source.config} vs "
                     f"{config}")
  return source


def _refuse_existing(output: str) -> None:
  if model_dir.steps(output) or (os.path.isdir(output) and os.listdir(output)):
    raise ExistingFileError(f"{output}: output directory exists and is not empty")


def _write_model_dir(source: ParamSource, output: str, scan_layers: bool, step: int = 0) -> None:
  """Writes `source` as step `step` of a new t5g directory, one tensor group at a time."""
  model_dir.save(output, step, lazy.lazy_params(source, scan_layers), source.config,
                 scan_layers, new_parameters=source.new_parameters())


def import_checkpoint(input_path: str, output: str, scan_layers: bool = True, step: int = 0,
                      config: ModelConfig | None = None) -> str:
  """Writes any supported checkpoint as step `step` of t5g dir `output`; returns its format."""
  release_freed_tensors()
  kind = detect(input_path)
  _refuse_existing(output)
  with open_source(input_path, config) as source:
    _write_model_dir(source, output, scan_layers, step)
  return kind


def adapt_checkpoint(encoder: str, decoder: str, output: str, cross_attention: str = "auto",
                     seed: int = 0, scan_layers: bool = True,
                     encoder_config: ModelConfig | None = None,
                     decoder_config: ModelConfig | None = None) -> AdaptedSource:
  """Writes the T5Gemma adapted from two Gemma 2 checkpoints as step 0 of `output`."""
  release_freed_tensors()
  _refuse_existing(output)
  enc = dec = open_source(encoder, encoder_config)
  try:
    same = os.path.realpath(encoder) == os.path.realpath(decoder) and (
        decoder_config is None or decoder_config == enc.config)
    if not same:
      dec = open_source(decoder, decoder_config)
    adapted = AdaptedSource(enc, dec, cross_attention, seed)
    _write_model_dir(adapted, output, scan_layers)
  finally:
    enc.close()
    if dec is not enc:
      dec.close()
  return adapted


def export_checkpoint(checkpoint: str, output: str, step: int | None = None,
                      dtype: str = "float32", verify: bool = True) -> float | None:
  """Writes a HF folder from a t5g step; returns the verification's max logit difference.

  A Gemma 2 becomes a Gemma2ForCausalLM folder, a T5Gemma a T5GemmaForConditionalGeneration, a
  classifier an encoder-only T5GemmaForSequenceClassification (its class logits are compared).

  verify: reload with transformers (when installed) and compare logits; raises above
  VERIFY_TOLERANCE, leaving the written folder for inspection.
  """
  release_freed_tensors()
  verify = verify and hf_verify.transformers_available()
  with ModelDirSource(checkpoint, step) as source:
    if not verify:
      hf_checkpoints.save(output, source, dtype)
      return None
    # Verification needs the whole model in memory anyway: read it once, write from memory.
    params = materialize(source, source.scanned)
  hf_checkpoints.save(output, TreeSource(params, source.config, source.scanned), dtype)
  stored = jax.tree_util.tree_map(lambda x: _round_to(x, dtype), params)
  diff = hf_verify.max_logit_difference(output, stored, source.config, source.scanned)
  if not diff <= VERIFY_TOLERANCE:
    raise RuntimeError(f"{output}: transformers' logits differ from t5g's by {diff:.3g} "
                       f"(> {VERIFY_TOLERANCE}); the export is suspect")
  return diff


def _round_to(x: np.ndarray, dtype: str) -> jax.Array:
  if dtype == "bfloat16":
    x = np.asarray(x).astype(ml_dtypes.bfloat16)
  return jnp.asarray(np.asarray(x, np.float32))
