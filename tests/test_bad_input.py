"""Bad input gives a one-line error naming the file/key at fault, and writes nothing."""

import json
import os
import shutil

import numpy as np

from t5g import cli
from t5g.compat import safetensors_io


def _run(capsys, *argv):
  code = cli.main(list(argv))
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  return err


def _copy(src, tmp_path, name="broken"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _rewrite_tensors(folder, edit):
  tensors = safetensors_io.SafetensorsFolder(folder)
  data = {k: np.array(tensors.get(k)) for k in tensors.keys()}
  edit(data)
  os.remove(os.path.join(folder, safetensors_io.SINGLE_FILE))
  safetensors_io.write_folder(folder, [(k, v.shape, v.dtype) for k, v in data.items()],
                              data.__getitem__)


def test_neither_hf_nor_t5g(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  err = _run(capsys, "import", f"--input={tmp_path}", f"--output={tmp_path / 'out'}")
  assert str(tmp_path) in err and "neither" in err
  assert not (tmp_path / "out").exists()


def test_missing_tensor(hf_t5gemma_dir, tmp_path, capsys):
  folder = _copy(hf_t5gemma_dir, tmp_path)
  _rewrite_tensors(folder, lambda d: d.pop("model.decoder.layers.2.cross_attn.k_proj.weight"))
  err = _run(capsys, "import", f"--input={folder}", f"--output={tmp_path / 'out'}")
  assert "model.decoder.layers.2.cross_attn.k_proj.weight" in err and folder in err
  assert not (tmp_path / "out").exists()


def test_config_and_weights_disagree(hf_t5gemma_dir, tmp_path, capsys):
  folder = _copy(hf_t5gemma_dir, tmp_path)
  path = os.path.join(folder, "config.json")
  config = json.load(open(path))
  config["decoder"]["intermediate_size"] += 8
  json.dump(config, open(path, "w"))
  err = _run(capsys, "import", f"--input={folder}", f"--output={tmp_path / 'out'}")
  assert "mlp.gate_proj.weight" in err and "shape" in err
  assert not (tmp_path / "out").exists()


def test_unsupported_config_key(hf_gemma2_dir, tmp_path, capsys):
  folder = _copy(hf_gemma2_dir, tmp_path)
  path = os.path.join(folder, "config.json")
  config = json.load(open(path))
  config["hidden_activation"] = "relu"
  json.dump(config, open(path, "w"))
  err = _run(capsys, "import", f"--input={folder}", f"--output={tmp_path / 'out'}")
  assert "config.json" in err and "hidden_activation" in err


def test_truncated_safetensors(hf_gemma2_dir, tmp_path, capsys):
  folder = _copy(hf_gemma2_dir, tmp_path)
  path = os.path.join(folder, safetensors_io.SINGLE_FILE)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  err = _run(capsys, "import", f"--input={folder}", f"--output={tmp_path / 'out'}")
  assert "model.safetensors" in err and "truncated" in err


def test_export_refuses_to_overwrite_and_missing_step(hf_gemma2_dir, tmp_path, capsys):
  ckpt = str(tmp_path / "ckpt")
  assert cli.main(["import", f"--input={hf_gemma2_dir}", f"--output={ckpt}"]) == 0
  capsys.readouterr()
  err = _run(capsys, "export", f"--checkpoint={ckpt}", "--step=7", f"--output={tmp_path / 'x'}")
  assert "step 7" in err and not (tmp_path / "x").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("precious")
  err = _run(capsys, "export", f"--checkpoint={ckpt}", f"--output={tmp_path / 'full'}")
  assert "not empty" in err and (tmp_path / "full" / "keep.txt").read_text() == "precious"
  err = _run(capsys, "import", f"--input={hf_gemma2_dir}", f"--output={ckpt}")
  assert "not empty" in err
