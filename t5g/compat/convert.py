"""`t5g import` and `t5g export`: HF folders <-> t5g checkpoint directories."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from t5g.checkpoints import model_dir
from t5g.compat import hf_checkpoints, hf_verify
from t5g.model.config import ComputeConfig
from t5g.model.models import abstract_params

# Max |logit difference| accepted by the export check (float32 math on identical weights).
VERIFY_TOLERANCE = 1e-3


def detect(path: str) -> str:
  """'hf' or 't5g'; anything else raises an error naming `path`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: does not exist")
  if hf_checkpoints.is_hf_folder(path):
    return "hf"
  if model_dir.is_model_dir(path):
    return "t5g"
  raise ValueError(f"{path}: neither a Hugging Face folder (config.json + model.safetensors or "
                   f"{'model.safetensors.index.json'}) nor a t5g checkpoint directory")


def import_checkpoint(input_path: str, output: str, scan_layers: bool = True,
                      step: int = 0) -> str:
  """Writes `input_path` (HF folder or t5g directory) as step `step` of t5g dir `output`."""
  kind = detect(input_path)
  if model_dir.steps(output):
    raise FileExistsError(f"{output}: already holds t5g steps {model_dir.steps(output)}")
  if kind == "hf":
    config, params = hf_checkpoints.load(
        input_path, lambda c: abstract_params(c, ComputeConfig(scan_layers=scan_layers)),
        scan_layers)
  else:
    config, params = model_dir.load(input_path, scanned=scan_layers)[:2]
  model_dir.save(output, step, params, config, scan_layers)
  return kind


def export_checkpoint(checkpoint: str, output: str, step: int | None = None,
                      dtype: str = "float32", verify: bool = True) -> float | None:
  """Writes a HF folder from a t5g step; returns the verification's max logit difference.

  verify: reload with transformers (when installed) and compare logits; raises above
  VERIFY_TOLERANCE, leaving the written folder for inspection.
  """
  config, params, _, scanned = model_dir.load(checkpoint, step)
  hf_checkpoints.save(output, params, config, scanned, dtype)
  if not verify or not hf_verify.transformers_available():
    return None
  stored = jax.tree_util.tree_map(lambda x: _round_to(x, dtype), params)
  diff = hf_verify.max_logit_difference(output, stored, config, scanned)
  if not diff <= VERIFY_TOLERANCE:
    raise RuntimeError(f"{output}: transformers' logits differ from t5g's by {diff:.3g} "
                       f"(> {VERIFY_TOLERANCE}); the export is suspect")
  return diff


def _round_to(x: np.ndarray, dtype: str) -> jax.Array:
  if dtype == "bfloat16":
    x = np.asarray(x).astype(ml_dtypes.bfloat16)
  return jnp.asarray(np.asarray(x, np.float32))
