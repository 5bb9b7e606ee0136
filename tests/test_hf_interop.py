"""HF folder <-> t5g checkpoint directory: bit-exact round trips, transformers reload, sharding."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.compat import convert, hf_checkpoints, safetensors_io


def _tensors(folder):
  out = {}
  index = os.path.join(folder, safetensors_io.INDEX_FILE)
  files = ([os.path.join(folder, safetensors_io.SINGLE_FILE)] if not os.path.exists(index) else
           [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")])
  for path in files:
    out.update(load_file(path))
  return out


@pytest.mark.parametrize("scan_layers", ["true", "false"])
def test_import_export_is_bit_identical(hf_t5gemma_dir, tmp_path, scan_layers):
  ckpt, out = str(tmp_path / "t5g"), str(tmp_path / "hf")
  assert cli.main(["import", f"--input={hf_t5gemma_dir}", f"--output={ckpt}",
                   f"--scan_layers={scan_layers}"]) == 0
  assert cli.main(["export", f"--checkpoint={ckpt}", f"--output={out}"]) == 0  # Verifies.
  original, exported = _tensors(hf_t5gemma_dir), _tensors(out)
  assert set(original) == set(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_gemma2_round_trip_and_bfloat16_export(hf_gemma2_dir, tmp_path):
  ckpt, out = str(tmp_path / "t5g"), str(tmp_path / "hf")
  convert.import_checkpoint(hf_gemma2_dir, ckpt, scan_layers=True)
  check = convert.export_checkpoint(ckpt, out, dtype="bfloat16").verification
  assert check is not None and check.difference <= convert.VERIFY_TOLERANCE
  assert check.past_windows() and not check.diverging  # Causal windows agree.
  original = _tensors(hf_gemma2_dir)
  exported = safetensors_io.SafetensorsFolder(out)
  for key, value in original.items():
    if key == "lm_head.weight":
      continue
    np.testing.assert_allclose(np.asarray(exported.get(key), np.float32), value, rtol=1e-2,
                               atol=1e-2, err_msg=key)


def test_sharded_folder_round_trip(hf_t5gemma_dir, tmp_path):
  out = str(tmp_path / "sharded")
  hf_checkpoints.save(out, hf_checkpoints.HFSource(hf_t5gemma_dir), max_shard_bytes=200_000)
  files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  assert len(files) > 1 and os.path.exists(os.path.join(out, safetensors_io.INDEX_FILE))
  import transformers
  model = transformers.T5GemmaForConditionalGeneration.from_pretrained(out)
  reference = transformers.T5GemmaForConditionalGeneration.from_pretrained(hf_t5gemma_dir)
  for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_t5g_directory_is_self_describing(hf_t5gemma_dir, tmp_path):
  ckpt, relaid = str(tmp_path / "a"), str(tmp_path / "b")
  convert.import_checkpoint(hf_t5gemma_dir, ckpt, scan_layers=False)
  assert convert.import_checkpoint(ckpt, relaid, scan_layers=True) == "t5g"
  a, b = model_dir.load(ckpt), model_dir.load(relaid, scanned=False)
  assert a.config == b.config and not a.scanned and not b.scanned
  for key, value in a.params["encoder"]["layer_2"]["attn"].items():
    np.testing.assert_array_equal(value, b.params["encoder"]["layer_2"]["attn"][key])
