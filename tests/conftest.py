"""Shared fixtures: tiny random transformers models saved as HF folders, built once per session.

The models are sized so that every Gemma 2 detail matters: sequences longer than the local
window, GQA, an unbalanced encoder/decoder, random (non-zero) norm scales and embeddings large
enough that the attention and final soft-caps bite.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
