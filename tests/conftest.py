"""Shared fixtures, built once per session: tiny random transformers models saved as HF folders,
random t5g checkpoints, and a tiny T5Gemma trained on arithmetic (`trained_arithmetic`).

The models are sized so that every Gemma 2 detail matters: sequences longer than the local
window, GQA, an unbalanced encoder/decoder, random (non-zero) norm scales and embeddings large
enough that the attention and final soft-caps bite.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests run on CPU. libtpu (the `tpu-aot` extra, for `t5g precompile`) would otherwise try
# to open a TPU at start-up and print its errors; compiling for a topology does not need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_t5gemma_dir(tmp_path_factory):
  """An unbalanced tiny T5GemmaForConditionalGeneration folder (float32 safetensors)."""
  folder = str(tmp_path_factory.mktemp("hf_t5gemma"))
  hf_models.tiny_t5gemma(seed=0).save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def hf_gemma2_dir(tmp_path_factory):
  """A tiny Gemma2ForCausalLM folder (float32 safetensors)."""
  folder = str(tmp_path_factory.mktemp("hf_gemma2"))
  hf_models.tiny_gemma2(seed=1).save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def hf_gemma2_wide_dir(tmp_path_factory):
  """A wider tiny Gemma2ForCausalLM folder (3 x 96, one KV head)."""
  folder = str(tmp_path_factory.mktemp("hf_gemma2_wide"))
  hf_models.tiny_gemma2_wide(seed=2).save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_t5gemma_checkpoint(tmp_path_factory):
  """A random t5gemma-tiny-tiny t5g checkpoint directory (step 0, scanned), read-only."""
  from tests import eval_fixtures
  return eval_fixtures.tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_t5gemma") / "ckpt"))


@pytest.fixture(scope="session")
def hf_t5gemma_imported(hf_t5gemma_dir, tmp_path_factory):
  """`hf_t5gemma_dir` imported by `t5g import` into a t5g checkpoint directory (step 0)."""
  from t5g import cli
  ckpt = str(tmp_path_factory.mktemp("hf_t5gemma_imported") / "t5g")
  assert cli.main(["import", f"--input={hf_t5gemma_dir}", f"--output={ckpt}"]) == 0
  return ckpt


@pytest.fixture(scope="session")
def tiny_classifier_checkpoint(tmp_path_factory):
  """A random 3-class encoder-only classifier t5g checkpoint (3-layer encoder, so scanned has a
  final_local_layer; step 0, scanned), with random norm scales and head bias, read-only."""
  from tests import hf_models
  return hf_models.tiny_classifier_checkpoint(
      str(tmp_path_factory.mktemp("tiny_classifier") / "ckpt"))


@pytest.fixture(scope="session")
def trained_arithmetic(tmp_path_factory):
  """A t5gemma-tiny-tiny trained by `t5g train` on arithmetic instructions
  (tests/trained_fixture.py), evaluated by the trainer at its last step; read-only. A dict:
  model_dir, train_files, validation_files, seconds (the training's wall time)."""
  from tests import trained_fixture
  return trained_fixture.train_arithmetic(str(tmp_path_factory.mktemp("trained_arithmetic")))
