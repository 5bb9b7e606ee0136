"""The embedded default run, until the trainer lands: the model-core pipeline end to end.

A tiny random T5Gemma is saved as a t5g checkpoint, exported to a Hugging Face folder (checked
against transformers when installed), imported back, and used to score text from Python's own
documentation (`t5g.data.embedded_corpus`), byte-tokenised (the demo predates the embedded
vocabulary; the trainer issue replaces it).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from t5g import scoring
from t5g.checkpoints import model_dir
from t5g.compat import convert
from t5g.data import embedded_corpus
from t5g.model import ComputeConfig, get_preset, init_params

PRESET = "t5gemma-tiny-tiny"


def _corpus_lines(count: int) -> list[str]:
  words = " ".join(embedded_corpus.documents()).split()
  return [" ".join(words[i * 24:(i + 1) * 24]) for i in range(count)]


def _byte_ids(text: str, vocab: int) -> list[int]:
  return [3 + b % (vocab - 3) for b in text.encode()]


def run(output: str) -> None:
  """Writes the demo's checkpoint, HF export and scores under `output` (replaced if present)."""
  shutil.rmtree(output, ignore_errors=True)
  config = get_preset(PRESET)
  params = init_params(config, ComputeConfig(scan_layers=True), jax.random.PRNGKey(0))
  ckpt, hf_dir, reimported = (os.path.join(output, n) for n in ("t5g", "hf", "reimported"))
  model_dir.save(ckpt, 0, jax.tree_util.tree_map(np.asarray, params), config, scanned=True)
  print(f"saved random {PRESET} to {ckpt}")
  diff = convert.export_checkpoint(ckpt, hf_dir)
  print(f"exported to {hf_dir}; transformers max |logit diff| = {diff}")
  convert.import_checkpoint(hf_dir, reimported)
  loaded = model_dir.load(reimported)
  lines = _corpus_lines(8)
  examples = [scoring.Example({"text": line}, _byte_ids(line[:40], config.vocab_size),
                              _byte_ids(line[40:80], config.vocab_size)) for line in lines]
  results = list(scoring.score(loaded.params, loaded.config, examples, 4, loaded.scanned))
  with open(os.path.join(output, "scores.jsonl"), "w") as f:
    for r in results:
      f.write(json.dumps({"text": r["text"], "log_likelihood": r["log_likelihood"]}) + "\n")
  mean = np.mean([r["log_likelihood"] / len(r["token_log_probs"]) for r in results])
  print(f"scored {len(results)} pydoc_data snippets: mean log-prob/token {mean:.3f} "
        f"(uniform would be {-np.log(config.vocab_size):.3f})")
