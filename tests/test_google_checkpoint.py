"""Google Flax/Orbax checkpoints (FLAT, NESTED, Kauldron) read into the same t5g parameters."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.compat import google_checkpoint, google_flax, hf_checkpoints, hf_config
from t5g.model import get_preset

EXTRA_ROWS = 128  # Google's tables have 128 padding rows.


def _import(tmp_path, capsys, source, *flags, name="imported"):
  out = str(tmp_path / name)
  code = cli.main(["import", f"--input={source}", f"--output={out}", *flags])
  err = capsys.readouterr().err
  assert code == 0, err
  return model_dir.load(out, scanned=False)


def _write_google(path, tree):
  ocp.PyTreeCheckpointer().save(os.path.abspath(path), tree)
  return str(path)


def _assert_same(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def gemma2(hf_gemma2_dir):
  """(HF config.json path, t5g config, unscanned params) of the tiny Gemma 2."""
  config, params = hf_checkpoints.load(hf_gemma2_dir, scanned=False)
  return os.path.join(hf_gemma2_dir, hf_config.CONFIG_FILE), config, params


@pytest.mark.parametrize("layout_name", ["nested", "flat", "flat_transposed", "kauldron"])
def test_gemma2_every_google_layout_gives_the_hf_params(gemma2, layout_name, tmp_path, capsys):
  config_json, config, params = gemma2
  nested = google_flax.to_google(params, config, False,
                                 transpose_gating=layout_name == "flat_transposed",
                                 num_embed=config.vocab_size + EXTRA_ROWS)
  tree = {"nested": nested,
          "flat": google_checkpoint.flatten_as_released({"transformer": nested}),
          "flat_transposed": google_checkpoint.flatten_as_released({"transformer": nested}),
          "kauldron": {"params": nested, "step": np.int64(7)}}[layout_name]
  if layout_name.startswith("flat"):
    assert "transformer/layer_0/attn/q_einsum" in tree
    assert set(tree["transformer/layer_0/mlp/gating_einsum"]) == {"w"}
  google_dir = _write_google(tmp_path / "google", tree)
  loaded = _import(tmp_path, capsys, google_dir, f"--config={config_json}", "--scan_layers=true")
  assert loaded.config == config
  _assert_same(loaded.params, params)


def test_t5gemma_google_layout(hf_t5gemma_dir, tmp_path, capsys):
  config, params = hf_checkpoints.load(hf_t5gemma_dir, scanned=True)
  google = google_flax.to_google(params, config, True, num_embed=config.vocab_size + EXTRA_ROWS)
  assert "cross_attn" in google["decoder"]["layer_0"]
  google_dir = _write_google(tmp_path / "google_t5", google)
  loaded = _import(tmp_path, capsys, google_dir,
                   f"--config={os.path.join(hf_t5gemma_dir, hf_config.CONFIG_FILE)}")
  _assert_same(loaded.params, hf_checkpoints.load(hf_t5gemma_dir, scanned=False)[1])


def test_adapt_from_google_equals_adapt_from_hf(gemma2, hf_gemma2_dir, tmp_path, capsys):
  config_json, config, params = gemma2
  flat = google_checkpoint.flatten_as_released({"transformer": google_flax.to_google(
      params, config, False, num_embed=config.vocab_size + EXTRA_ROWS)})
  google_dir = _write_google(tmp_path / "google", flat)
  outs = []
  for name, src, flags in (("from_google", google_dir, [f"--encoder_config={config_json}",
                                                        f"--decoder_config={config_json}"]),
                           ("from_hf", hf_gemma2_dir, [])):
    out = str(tmp_path / name)
    assert cli.main(["adapt", f"--encoder={src}", f"--decoder={src}", f"--output={out}",
                     *flags]) == 0, capsys.readouterr().err
    outs.append(model_dir.load(out))
  _assert_same(outs[0].params, outs[1].params)


class _Shape:
  """A stored-leaf stand-in that only has a shape."""

  def __init__(self, *shape):
    self.shape = shape


def _shape_tree(cfg, rows, transposed):
  gating = (2, cfg.hidden_dim, cfg.embed_dim) if transposed else (2, cfg.embed_dim,
                                                                  cfg.hidden_dim)
  layer = {"attn": {"q_einsum": {"w": _Shape(cfg.num_heads, cfg.embed_dim, cfg.head_dim)},
                    "kv_einsum": {"w": _Shape(2, cfg.num_kv_heads, cfg.embed_dim,
                                              cfg.head_dim)}},
           "mlp": {"gating_einsum": {"w": _Shape(*gating)},
                   "linear": {"w": _Shape(cfg.hidden_dim, cfg.embed_dim)}}}
  tree = {f"layer_{i}": layer for i in range(cfg.num_layers)}
  tree["embedder"] = {"input_embedding": _Shape(rows, cfg.embed_dim)}
  return tree


def test_configs_are_inferred_from_released_shapes():
  nine, two = get_preset("gemma2-9b"), get_preset("gemma2-2b")
  assert google_checkpoint.infer_config({"transformer": _shape_tree(nine, 256128, True)},
                                        "g") == nine
  t5 = {"encoder": _shape_tree(nine, 256128, True), "decoder": _shape_tree(two, 256128, False)}
  assert google_checkpoint.infer_config(t5, "g") == get_preset("t5gemma-9b-2b")
  with pytest.raises(ValueError, match="ckpt: no Gemma 2 preset has these sizes"):
    google_checkpoint.infer_config(_shape_tree(get_preset("gemma2-tiny"), 640, False), "ckpt")


def test_bad_google_checkpoints(gemma2, tmp_path, capsys):
  config_json, config, params = gemma2
  nested = google_flax.to_google(params, config, False, num_embed=config.vocab_size + EXTRA_ROWS)

  def fail(source, *flags):
    code = cli.main(["import", f"--input={source}", f"--output={tmp_path / 'out'}", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err

  good = _write_google(tmp_path / "good", nested)
  assert "no Gemma 2 preset" in fail(good) and "--config" in fail(good)
  missing = dict(nested, layer_1={k: v for k, v in nested["layer_1"].items() if k != "mlp"})
  err = fail(_write_google(tmp_path / "missing", missing), f"--config={config_json}")
  assert "layer_1/mlp/gating_einsum" in err
  extra = dict(nested, stray={"w": np.zeros(3, np.float32)})
  err = fail(_write_google(tmp_path / "extra", extra), f"--config={config_json}")
  assert "unexpected key" in err and "stray/w" in err
  assert "gemma2-tin" in fail(good, "--config=gemma2-tinny")
