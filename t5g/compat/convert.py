"""`t5g import`, `t5g export` and `t5g adapt`: any supported checkpoint in, t5g or HF out.

Formats are detected from the path: a Hugging Face folder (config.json + safetensors), a t5g
checkpoint directory, or a Google Flax/Orbax checkpoint (FLAT or NESTED). Every conversion is a
`ParamSource` written lazily, one tensor group at a time, so no whole model is held in memory.

The vocabulary goes along (`source_vocabulary`): a HF folder's SentencePiece `tokenizer.model`
is copied into the t5g directory and recorded, a t5g directory's record is kept, `adapt` takes
the decoder source's (else the encoder's), and `export` writes the recorded one (the embedded
model included) into the HF folder as `tokenizer.model`, which transformers' GemmaTokenizer
reads. Google checkpoints come without their tokenizer: nothing is recorded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from t5g.checkpoints import lazy, model_dir
from t5g.checkpoints.adapt import AdaptedSource
from t5g.checkpoints.sources import ModelDirSource, ParamSource, TreeSource, materialize
from t5g.compat import google_checkpoint, hf_checkpoints, hf_config, hf_verify
from t5g.data.vocabulary import vocabulary_file
from t5g.model import layout
from t5g.errors import ExistingFileError, InputError, MissingFileError
from t5g.model.config import ModelConfig, config_from_json
from t5g.model.presets import PRESETS, get_preset

# Max |logit difference| accepted by the export check (float32 math on identical weights).
VERIFY_TOLERANCE = 1e-3
# The longest row the export check compares by default: past every window of the tiny presets;
# 4096-token windows need --verify_max_length=4098 (minutes of CPU; docs/architecture.md).
VERIFY_MAX_LENGTH = 512
# `--hf_sliding_window`: what an exported folder's `sliding_window` holds (hf_windows).
WINDOW_CHOICES = ("released", "match")


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


def source_vocabulary(path: str) -> str | None:
  """The vocabulary of the checkpoint at `path`, as `model_dir.store_vocabulary` takes it: a HF
  folder's `tokenizer.model`, what a t5g directory's latest step records; None for a HF folder
  without tokenizer.model, a t5g step without a record, or a Google checkpoint."""
  kind = detect(path)
  if kind == "hf":
    tokenizer = os.path.join(path, hf_checkpoints.TOKENIZER_FILE)
    return tokenizer if os.path.isfile(tokenizer) else None
  return model_dir.read_vocabulary(path) if kind == "t5g" else None


def _refuse_existing(output: str) -> None:
  if model_dir.steps(output) or (os.path.isdir(output) and os.listdir(output)):
    raise ExistingFileError(f"{output}: output directory exists and is not empty")


def _write_model_dir(source: ParamSource, output: str, scan_layers: bool, step: int = 0,
                     vocabulary: str | None = None) -> None:
  """Writes `source` as step `step` of a new t5g directory, one tensor group at a time, with
  `vocabulary` (as `model_dir.save` takes it)."""
  model_dir.save(output, step, lazy.lazy_params(source, scan_layers), source.config,
                 scan_layers, new_parameters=source.new_parameters(), vocabulary=vocabulary)


def import_checkpoint(input_path: str, output: str, scan_layers: bool = True, step: int = 0,
                      config: ModelConfig | None = None) -> str:
  """Writes any supported checkpoint as step `step` of t5g dir `output`; returns its format."""
  release_freed_tensors()
  kind = detect(input_path)
  _refuse_existing(output)
  vocabulary = source_vocabulary(input_path)
  with open_source(input_path, config) as source:
    _write_model_dir(source, output, scan_layers, step, vocabulary)
  return kind


def adapt_checkpoint(encoder: str, decoder: str, output: str, cross_attention: str = "auto",
                     seed: int = 0, scan_layers: bool = True,
                     encoder_config: ModelConfig | None = None,
                     decoder_config: ModelConfig | None = None) -> AdaptedSource:
  """Writes the T5Gemma adapted from two Gemma 2 checkpoints as step 0 of `output`, with the
  decoder source's vocabulary (else the encoder source's)."""
  release_freed_tensors()
  _refuse_existing(output)
  vocabulary = source_vocabulary(decoder) or source_vocabulary(encoder)
  enc = dec = open_source(encoder, encoder_config)
  try:
    same = os.path.realpath(encoder) == os.path.realpath(decoder) and (
        decoder_config is None or decoder_config == enc.config)
    if not same:
      dec = open_source(decoder, decoder_config)
    adapted = AdaptedSource(enc, dec, cross_attention, seed)
    _write_model_dir(adapted, output, scan_layers, vocabulary=vocabulary)
  finally:
    enc.close()
    if dec is not enc:
      dec.close()
  return adapted


@dataclasses.dataclass(frozen=True)
class Export:
  """What `export_checkpoint` wrote and checked.

  windows: the `sliding_window` written per stack (layout.stacks names); choice: the
  `--hf_sliding_window` value; offsets: hf_verify.window_offsets of the installed transformers
  (None when not measured: not installed, or not needed); verification: None when not verified.
  """

  windows: dict[str, int]
  choice: str
  offsets: dict[str, int] | None
  verification: hf_verify.Verification | None

  def lines(self) -> list[str]:
    """What the export tells the user about the window convention and the verification."""
    if self.offsets is None:
      return []
    version = hf_verify.transformers_version()
    out = [_convention_line(stack, offset, self.windows[stack], self.choice, version)
           for stack, offset in self.offsets.items() if offset]
    check = self.verification
    if check is None:
      return out
    lengths = _lengths(check.checked)
    windows = "/".join(str(w) for w in check.windows.values())
    if check.diverging and check.beyond is None:
      return out + [
          f"verified with transformers {version} only on rows of up to {lengths}: max |logit "
          f"difference| = {check.difference:.3g} (tolerance {VERIFY_TOLERANCE})",
          "NOT verified on longer inputs, where this transformers differs from t5g (the window "
          "convention above; longer rows were not compared: --verify_max_length)"]
    if not check.diverging:
      covered = ("past the local windows" if check.past_windows() else
                 "not longer than the local windows: longer inputs, where the window convention "
                 "matters, were not compared (--verify_max_length)")
      return out + [f"verified with transformers {version}: max |logit difference| = "
                    f"{check.difference:.3g} (tolerance {VERIFY_TOLERANCE}) on padded rows of up "
                    f"to {lengths} ({covered}: {windows})"]
    return out + [
        f"verified with transformers {version} only on rows of up to {lengths}: max |logit "
        f"difference| = {check.difference:.3g} (tolerance {VERIFY_TOLERANCE})",
        f"NOT verified on longer inputs: on rows of {_lengths(check.beyond)} transformers "
        f"differs from t5g by {check.beyond_difference:.3g} (the window convention above); "
        "--hf_sliding_window=match writes a folder that this transformers runs as t5g does"]


def _convention_line(stack: str, offset: int, written: int, choice: str, version: str) -> str:
  keeps = "|q - kv| <= sliding_window" if offset == 1 else f"|q - kv| < sliding_window + {offset}"
  name = "" if stack == "transformer" else f" {stack}"
  head = (f"transformers {version} keeps {keeps} in the{name} local layers, t5g and Google's "
          f"reference |q - kv| < W: ")
  if choice == "match":
    return head + (f"the folder holds{name} sliding_window = {written} (W - {offset}, "
                   f"--hf_sliding_window=match) and records W = {written + offset} as "
                   f"{hf_config.T5G_WINDOW_KEY}")
  return head + (f"the folder holds{name} sliding_window = W = {written}, as Google's released "
                 f"folders (--hf_sliding_window=released), so this transformers differs from t5g "
                 f"on{name} inputs longer than {written} tokens")


def _lengths(lengths: dict[str, int]) -> str:
  """'10 encoder / 9 decoder tokens' or '10 tokens'."""
  return " / ".join(f"{n}" + ("" if s == "transformer" else f" {s}")
                    for s, n in lengths.items()) + " tokens"


def hf_windows(config: ModelConfig, choice: str,
               offsets: dict[str, int] | None) -> dict[str, int]:
  """The `sliding_window` to write per stack: W ('released'), or W minus the installed
  transformers' offset ('match', which needs `offsets`)."""
  stacks = layout.stacks(config)
  if choice == "released":
    return {s: c.sliding_window for s, c in stacks.items()}
  if choice != "match":
    raise InputError(f"--hf_sliding_window={choice!r}: choose one of {', '.join(WINDOW_CHOICES)}")
  if offsets is None:
    raise InputError("--hf_sliding_window=match: the value that makes the installed transformers "
                     "reproduce t5g needs transformers and torch installed; use "
                     "--hf_sliding_window=released (sliding_window = W, as Google's folders)")
  windows = {s: c.sliding_window - offsets[s] for s, c in stacks.items()}
  for s, window in windows.items():
    if window < 1:
      raise InputError(f"--hf_sliding_window=match: the {s}'s window {stacks[s].sliding_window} "
                       f"would be written as {window}")
  return windows


def export_checkpoint(checkpoint: str, output: str, step: int | None = None,
                      dtype: str = "float32", verify: bool = True,
                      hf_sliding_window: str = "released",
                      verify_max_length: int | None = None) -> Export:
  """Writes a HF folder from a t5g step.

  A Gemma 2 becomes a Gemma2ForCausalLM folder, a T5Gemma a T5GemmaForConditionalGeneration, a
  classifier an encoder-only T5GemmaForSequenceClassification (its class logits are compared).
  The vocabulary the step records is written as the folder's tokenizer.model.

  hf_sliding_window: 'released' writes each stack's window W; 'match' the value with which the
  installed transformers computes t5g's window (hf_windows; docs/architecture.md). verify:
  reload with transformers (when installed) and compare logits on rows past the local windows,
  up to verify_max_length tokens (None: VERIFY_MAX_LENGTH; hf_verify.verify_export). The
  folder is written under a temporary name and moved to `output` once verified; above
  VERIFY_TOLERANCE it is deleted and the export raises with the measured difference.
  """
  verify_max_length = VERIFY_MAX_LENGTH if verify_max_length is None else verify_max_length
  if verify_max_length < 2:
    raise InputError(f"--verify_max_length={verify_max_length}: must be at least 2")
  if os.path.exists(output) and os.listdir(output):
    raise ExistingFileError(f"{output}: output folder exists and is not empty")
  release_freed_tensors()
  installed = hf_verify.transformers_available()
  verify = verify and installed
  with ModelDirSource(checkpoint, step) as source:
    config, scanned = source.config, source.scanned
    recorded = model_dir.read_vocabulary(checkpoint, source.step)
    tokenizer = None if recorded is None else vocabulary_file(recorded)
    needed = installed and (verify or hf_sliding_window == "match")
    offsets = hf_verify.window_offsets(config) if needed else None
    windows = hf_windows(config, hf_sliding_window, offsets)
    if not verify:
      hf_checkpoints.save(output, source, dtype, tokenizer=tokenizer, windows=windows)
      return Export(windows, hf_sliding_window, offsets, None)
    # Verification needs the whole model in memory anyway: read it once, write from memory.
    params = materialize(source, scanned)
  unverified = f"{output.rstrip('/')}.unverified-{os.getpid()}"
  hf_checkpoints.save(unverified, TreeSource(params, config, scanned), dtype,
                      tokenizer=tokenizer, windows=windows)
  try:
    stored = jax.tree_util.tree_map(lambda x: _round_to(x, dtype), params)
    check = hf_verify.verify_export(unverified, stored, config, scanned, windows, offsets,
                                    verify_max_length)
    if not check.difference <= VERIFY_TOLERANCE:
      raise RuntimeError(
          f"{output}: not written: transformers' logits differ from t5g's by "
          f"{check.difference:.3g} (> {VERIFY_TOLERANCE}) on rows of up to "
          f"{_lengths(check.checked)}; the export is suspect (--no-verify writes it unchecked)")
    if os.path.exists(output):
      os.rmdir(output)  # Empty, checked above.
    os.replace(unverified, output)
  except BaseException:
    shutil.rmtree(unverified, ignore_errors=True)
    raise
  return Export(windows, hf_sliding_window, offsets, check)


def _round_to(x: np.ndarray, dtype: str) -> jax.Array:
  if dtype == "bfloat16":
    x = np.asarray(x).astype(ml_dtypes.bfloat16)
  return jnp.asarray(np.asarray(x, np.float32))
