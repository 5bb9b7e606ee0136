"""Self-describing checkpoints: a t5g directory records the vocabulary its model was trained with,
so `t5g generate` / `t5g score` read text without --vocabulary; the flag still wins, and a
vocabulary of another size than the model's is refused, naming the file and both sizes."""

from __future__ import annotations

import json
import os
import shutil
import types

import gin
import pytest

from t5g import cli
from t5g.checkpoints import model_dir
from t5g.checkpoints.manager import TrainCheckpointManager
from t5g.data import vocabulary as vocabularies
from t5g.model.config import EMBEDDED_VOCABULARY
from tests import eval_fixtures

TEXT = {"inputs": "The for statement is used to iterate", "targets": "over the elements"}


def _sentencepiece(directory, name: str, vocab_size: int) -> str:
  """A SentencePiece model set up as Gemma's (special pieces and ids, no normalisation, no
  dummy prefix: what transformers' GemmaTokenizer assumes), trained on every other of Python's
  help topics, so it splits text otherwise than the embedded model."""
  import sentencepiece as spm
  from pydoc_data import topics
  corpus = os.path.join(directory, f"{name}.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(list(topics.topics.values())[::2]))
  prefix = os.path.join(directory, name)
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", pad_id=0,
      eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
      unk_piece="<unk>", normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("spm")


@pytest.fixture(scope="module")
def other_512(spm_dir):
  """A 512-piece vocabulary (the model's size) that is not the embedded one."""
  return _sentencepiece(str(spm_dir), "other512", 512)


@pytest.fixture(scope="module")
def small_300(spm_dir):
  """A 300-piece vocabulary: the wrong size for the 512-token tiny models."""
  return _sentencepiece(str(spm_dir), "small300", 300)


@pytest.fixture(scope="module")
def tiny_model():
  """(config, params) of a random t5gemma-tiny-tiny (scanned), as the eval tests make it."""
  import jax
  from t5g.model import presets
  from t5g.model.config import ComputeConfig
  from t5g.model.models import init_params
  config = presets.get_preset(eval_fixtures.PRESET)
  params = jax.jit(lambda key: init_params(config, ComputeConfig(scan_layers=True), key))(
      jax.random.PRNGKey(0))
  return config, params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A t5gemma-tiny-tiny trained 2 steps by `t5g train` on the embedded corpus (PrefixLM)."""
  run = str(tmp_path_factory.mktemp("trained") / "run")
  cli.register_configurables()
  try:
    status = cli.main([
        "train", "--gin_file=models/t5gemma-tiny-tiny.gin", "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR='{run}'", "--gin.MIXTURE_OR_TASK_NAME='t5g.embedded.prefix_lm'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}", "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=2", "--gin.WARMUP_STEPS=1",
        "--gin_bindings=t5g.ComputeConfig.dtype = 'float32'",
        "--gin_bindings=t5g.train.peak_flops_per_device = 1e12"])
  finally:
    gin.clear_config()
  assert status == 0
  return run


def _run(tmp_path, command, ckpt, records, *extra):
  """(exit status, output records or None) of `t5g generate|score` on `records`."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in records))
  limits = ["--max_new_tokens=4"] if command == "generate" else []
  code = cli.main([command, f"--checkpoint={ckpt}", f"--input={src}", f"--output={dst}",
                   "--batch_size=2", *limits, *extra])
  return code, ([json.loads(line) for line in dst.read_text().splitlines()]
                if dst.exists() else None)


def test_training_records_the_embedded_vocabulary(trained):
  meta, _ = model_dir.read_metadata(trained)
  assert meta["vocabulary"] == EMBEDDED_VOCABULARY
  assert model_dir.read_vocabulary(trained) == EMBEDDED_VOCABULARY
  assert not os.path.exists(os.path.join(trained, model_dir.VOCABULARY_FILE))


def test_generate_text_without_the_flag(trained, tmp_path):
  code, results = _run(tmp_path, "generate", trained, [{"inputs": TEXT["inputs"], "id": 7}])
  assert code == 0 and results[0]["id"] == 7
  ids = results[0]["generated_ids"]
  embedded = vocabularies.get_vocabulary().tokenizer
  assert len(ids) == 4 and results[0]["generated_text"] == embedded.decode(
      [t for t in ids if t != 1])


def test_score_text_without_the_flag_and_the_flag_wins(trained, other_512, tmp_path):
  def as_ids(vocabulary):
    return {field: vocabulary.encode(text) for field, text in TEXT.items()}
  embedded = vocabularies.get_vocabulary().tokenizer
  other = vocabularies.get_vocabulary(other_512).tokenizer
  assert as_ids(embedded) != as_ids(other)
  code, recorded = _run(tmp_path, "score", trained, [TEXT, as_ids(embedded)])
  assert code == 0 and recorded[0]["inputs"] == TEXT["inputs"]
  assert recorded[0]["token_log_probs"] == recorded[1]["token_log_probs"]
  code, flagged = _run(tmp_path, "score", trained, [TEXT, as_ids(other)],
                       f"--vocabulary={other_512}")
  assert code == 0 and flagged[0]["token_log_probs"] == flagged[1]["token_log_probs"]
  assert flagged[0]["token_log_probs"] != recorded[0]["token_log_probs"]


@pytest.mark.parametrize("command", ["generate", "score"])
def test_a_flag_of_another_size_is_named(trained, small_300, tmp_path, capsys, command):
  code, results = _run(tmp_path, command, trained, [TEXT], f"--vocabulary={small_300}")
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and results is None
  assert f"--vocabulary={small_300}: 300 pieces" in err and "vocab_size 512" in err, err
  assert not [p for p in os.listdir(tmp_path) if p.startswith("out.jsonl")]


def test_a_copied_tokenizer_is_read_after_the_original_is_gone(tiny_model, other_512, small_300,
                                                               tmp_path):
  original = str(tmp_path / "user" / "tokenizer.model")
  os.makedirs(os.path.dirname(original))
  shutil.copyfile(other_512, original)
  ckpt = str(tmp_path / "ckpt")
  config, params = tiny_model
  model_dir.save(ckpt, 0, params, config, scanned=True, vocabulary=original)
  os.remove(original)
  copied = os.path.join(os.path.abspath(ckpt), model_dir.VOCABULARY_FILE)
  assert model_dir.read_vocabulary(ckpt) == copied
  moved = str(tmp_path / "moved")
  shutil.move(ckpt, moved)  # The directory is whole without the original file.
  code, results = _run(tmp_path, "score", moved, [TEXT])
  other = vocabularies.get_vocabulary(other_512).tokenizer
  assert code == 0 and len(results[0]["token_log_probs"]) == len(other.encode(TEXT["targets"]))
  with pytest.raises(FileExistsError, match="holds another SentencePiece model"):
    model_dir.store_vocabulary(moved, small_300)


def test_a_recorded_vocabulary_of_another_size_is_named(tiny_model, small_300, tmp_path, capsys):
  ckpt = str(tmp_path / "ckpt")
  config, params = tiny_model
  model_dir.save(ckpt, 0, params, config, scanned=True, vocabulary=small_300)
  code, results = _run(tmp_path, "generate", ckpt, [{"inputs": [5, 6]}])
  err = capsys.readouterr().err
  recorded = os.path.join(os.path.abspath(ckpt), model_dir.VOCABULARY_FILE)
  assert code == 2 and results is None
  assert f"{recorded} (the vocabulary {ckpt} records): 300 pieces" in err, err
  assert "vocab_size 512" in err


def test_a_missing_recorded_file_is_named(tiny_model, other_512, tmp_path, capsys):
  ckpt = str(tmp_path / "ckpt")
  config, params = tiny_model
  model_dir.save(ckpt, 0, params, config, scanned=True, vocabulary=other_512)
  os.remove(os.path.join(ckpt, model_dir.VOCABULARY_FILE))
  code, results = _run(tmp_path, "score", ckpt, [TEXT])
  err = capsys.readouterr().err
  assert code == 2 and results is None and "records the vocabulary 'tokenizer.model'" in err
  code, results = _run(tmp_path, "score", ckpt, [TEXT], f"--vocabulary={other_512}")
  assert code == 0 and len(results) == 1


def test_old_directories_without_a_record(tiny_t5gemma_checkpoint, tmp_path, capsys):
  assert model_dir.read_vocabulary(tiny_t5gemma_checkpoint) is None
  code, results = _run(tmp_path, "generate", tiny_t5gemma_checkpoint, [{"inputs": "text"}])
  err = capsys.readouterr().err
  assert code == 2 and results is None
  assert "in.jsonl:1: 'inputs' is text; pass --vocabulary (the checkpoint records no" in err
  code, results = _run(tmp_path, "generate", tiny_t5gemma_checkpoint, [{"inputs": [5, 6]}])
  assert code == 0 and "generated_text" not in results[0]


def test_the_manager_copies_the_run_vocabulary_once(tiny_model, other_512, small_300, tmp_path):
  config, _ = tiny_model
  run = str(tmp_path / "run")
  with TrainCheckpointManager(run, config, True, vocabulary=other_512) as manager:
    assert manager._model["vocabulary"] == model_dir.VOCABULARY_FILE
  with open(os.path.join(run, model_dir.VOCABULARY_FILE), "rb") as copy, \
       open(other_512, "rb") as original:
    assert copy.read() == original.read()
  TrainCheckpointManager(run, config, True, vocabulary=other_512).close()  # A resume: the same.
  with pytest.raises(FileExistsError, match="tokenizer.model"):
    TrainCheckpointManager(run, config, True, vocabulary=small_300)


def test_what_a_task_records(other_512):
  from t5g.data.classification_tasks import classification_features
  from t5g.data.tasks import text_features
  task = lambda features: types.SimpleNamespace(name="t", output_features=features)  # noqa: E731
  assert vocabularies.task_vocabulary(task(text_features(None))) == EMBEDDED_VOCABULARY
  assert vocabularies.task_vocabulary(task(text_features(other_512))) == other_512
  assert vocabularies.task_vocabulary(task(classification_features(3, other_512))) == other_512
  mixed = {"inputs": text_features(None)["inputs"], "targets": text_features(other_512)["targets"]}
  assert vocabularies.task_vocabulary(task(mixed)) is None


def test_t5g_to_t5g_import_average_and_export_keep_the_embedded_vocabulary(trained, tmp_path):
  copy, averaged, hf = str(tmp_path / "copy"), str(tmp_path / "averaged"), str(tmp_path / "hf")
  assert cli.main(["import", f"--input={trained}", f"--output={copy}"]) == 0
  assert model_dir.read_vocabulary(copy) == EMBEDDED_VOCABULARY
  assert cli.main(["average", f"--checkpoint={trained}", "--last=1", f"--output={averaged}"]) == 0
  assert model_dir.read_vocabulary(averaged) == EMBEDDED_VOCABULARY
  assert cli.main(["export", f"--checkpoint={copy}", f"--output={hf}", "--no-verify"]) == 0
  with open(os.path.join(hf, "tokenizer.model"), "rb") as exported, \
       open(vocabularies.EMBEDDED_VOCABULARY_PATH, "rb") as embedded:
    assert exported.read() == embedded.read()


def test_hf_folders_carry_their_tokenizer(hf_t5gemma_dir, hf_gemma2_dir, other_512, tmp_path):
  import transformers
  folder = str(tmp_path / "hf_in")
  shutil.copytree(hf_t5gemma_dir, folder)
  shutil.copyfile(other_512, os.path.join(folder, "tokenizer.model"))
  ckpt, hf = str(tmp_path / "t5g"), str(tmp_path / "hf_out")
  assert cli.main(["import", f"--input={folder}", f"--output={ckpt}"]) == 0
  copied = model_dir.read_vocabulary(ckpt)
  assert copied == os.path.join(os.path.abspath(ckpt), "tokenizer.model")
  with open(copied, "rb") as f, open(other_512, "rb") as original:
    assert f.read() == original.read()
  assert cli.main(["export", f"--checkpoint={ckpt}", f"--output={hf}", "--no-verify"]) == 0
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
  other = vocabularies.get_vocabulary(other_512).tokenizer
  assert tokenizer(TEXT["inputs"], add_special_tokens=False).input_ids == other.encode(
      TEXT["inputs"])
  gemma2 = str(tmp_path / "g2")
  shutil.copytree(hf_gemma2_dir, gemma2)
  shutil.copyfile(other_512, os.path.join(gemma2, "tokenizer.model"))
  adapted = str(tmp_path / "adapted")
  assert cli.main(["adapt", f"--encoder={hf_gemma2_dir}", f"--decoder={gemma2}",
                   f"--output={adapted}"]) == 0
  assert model_dir.read_vocabulary(adapted) == os.path.join(os.path.abspath(adapted),
                                                            "tokenizer.model")
