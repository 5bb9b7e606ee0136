"""The embedded vocabulary, the special token strings and the embedded corpus."""

from __future__ import annotations

import sys

import pytest
import sentencepiece as spm

from t5g.data import embedded_corpus, make_embedded_vocabulary
from t5g.data.vocabulary import EMBEDDED_VOCABULARY_PATH, SpecialTokens, get_vocabulary


@pytest.fixture(scope="module")
def vocabulary():
  return get_vocabulary()


def test_embedded_model_has_gemma_ids(vocabulary):
  processor = vocabulary.tokenizer
  assert vocabulary.vocab_size == 512 and processor.get_piece_size() == 512
  assert (processor.pad_id(), processor.eos_id(), processor.bos_id(), processor.unk_id()) == (
      0, 1, 2, 3)
  assert [processor.id_to_piece(index) for index in range(4)] == [
      "<pad>", "<eos>", "<bos>", "<unk>"]
  # Gemma 2's reserved pieces at Gemma 2's ids.
  assert processor.piece_to_id("<unused0>") == 7
  assert processor.piece_to_id("<unused98>") == 105
  assert processor.piece_to_id("<start_of_turn>") == 106
  assert processor.piece_to_id("<end_of_turn>") == 107


def test_special_strings_are_single_pieces(vocabulary):
  special_tokens = SpecialTokens()
  assert special_tokens.sentinel_ids(vocabulary, 64) == list(range(7, 71))
  assert [special_tokens.mode_id(vocabulary, name) for name in "RXS"] == [103, 104, 105]
  # Written in text, each string still encodes to its one piece.
  for token in special_tokens.sentinels[:3] + ("<unused96>", "<start_of_turn>", "<end_of_turn>"):
    assert vocabulary.encode(token) == [vocabulary.tokenizer.piece_to_id(token)]


def test_strings_that_are_not_pieces_fail_clearly(vocabulary):
  with pytest.raises(ValueError, match=r"'<extra_id_0>' is not a single piece"):
    SpecialTokens(sentinels=("<extra_id_0>",)).sentinel_ids(vocabulary, 1)
  with pytest.raises(ValueError, match=r"'\[NLU\]' is not a single piece"):
    SpecialTokens(modes=(("R", "[NLU]"),)).mode_id(vocabulary, "R")
  with pytest.raises(ValueError, match="unknown mode 'Q'"):
    SpecialTokens().mode_id(vocabulary, "Q")
  with pytest.raises(ValueError, match="asked for 65 sentinels"):
    SpecialTokens().sentinel_ids(vocabulary, 65)
  with pytest.raises(ValueError, match="used twice"):
    SpecialTokens(modes=(("R", "<unused0>"),))


def test_corpus_round_trips(vocabulary):
  documents = embedded_corpus.documents()
  assert len(documents) > 50 and sum(map(len, documents)) > 300_000
  for document in documents:
    ids = vocabulary.encode(document)
    assert 3 not in ids  # No unknown piece.
    assert vocabulary.decode(ids) == document


def test_regeneration_reproduces_the_shipped_model():
  documents = embedded_corpus.documents()
  if make_embedded_vocabulary.corpus_fingerprint(documents) != (
      make_embedded_vocabulary.SHIPPED_CORPUS_SHA256):
    pytest.skip(f"Python {sys.version.split()[0]}'s pydoc topics differ from the corpus the "
                "shipped model was trained on")
  with open(EMBEDDED_VOCABULARY_PATH, "rb") as file:
    shipped = file.read()
  assert make_embedded_vocabulary.train_model(documents) == shipped


def test_missing_vocabulary_path(tmp_path):
  missing = str(tmp_path / "no" / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    get_vocabulary(missing)


def test_vocabulary_with_other_special_ids_is_refused(tmp_path):
  path = tmp_path / "t5_ids.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(embedded_corpus.documents()[0].split("\n")),
      model_prefix=str(tmp_path / "t5_ids"), vocab_size=100, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  with pytest.raises(ValueError, match=r"pad/eos/bos ids are \(0, 1, -1\)"):
    get_vocabulary(str(path))


def test_corpus_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
  with pytest.raises(RuntimeError, match="pydoc_data.topics"):
    embedded_corpus.documents()
