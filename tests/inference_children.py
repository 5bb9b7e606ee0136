"""Child process of tests/test_inference_sharded.py: decoding on 4 fake CPU devices.

    python -m tests.inference_children   # with XLA_FLAGS=--xla_force_host_platform_device_count=4

Decodes the same batch with random t5gemma-tiny-tiny parameters (scanned) on one device and on
a (fsdp 2, tensor 2) mesh with beam search, and prints one JSON line: {run: tokens}.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from t5g.inference.decoding import DecodeConfig, generate
from t5g.model.config import ComputeConfig
from t5g.model.models import init_params
from t5g.model.presets import get_preset
from t5g.runtime import partitioning

MESHES = {"fsdp2_tensor2": {"data": 1, "fsdp": 2, "tensor": 2}}
# Beam search: besides the model and the token choice that greedy decoding also runs, it
# reorders the cache's rows, which the sharding must follow.
DECODE = DecodeConfig(max_new_tokens=6, beam_size=2, length_penalty=0.5)


def main() -> None:
  """Prints {run: tokens} for the single device ("one") and every mesh."""
  config = get_preset("t5gemma-tiny-tiny")
  compute = ComputeConfig("float32", "float32")
  params = init_params(config, compute, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  inputs = rng.randint(3, config.vocab_size, (4, 12)).astype(np.int32)
  inputs[1, 5:] = inputs[3, 2:] = 0
  runs = {"one": None, **{name: partitioning.make_mesh(partitioning.MeshConfig(**sizes))
                          for name, sizes in MESHES.items()}}
  report = {}
  for name, mesh in runs.items():
    out = generate(config, params, inputs, DECODE, compute=compute, scanned=True, mesh=mesh)
    report[name] = out.tokens.tolist()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
