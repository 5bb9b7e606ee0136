"""Trains the embedded 512-piece SentencePiece model: `python -m t5g.data.make_embedded_vocabulary`.

The model is trained on the embedded corpus (`t5g.data.embedded_corpus`) and written to
`t5g/data/assets/embedded_spm.model`. Training is single-threaded over the corpus lines in a
fixed order, so the same corpus and sentencepiece version give the same file, byte for byte.

Its first 108 ids follow Gemma 2's layout: pad 0, eos 1, bos 2, unk 3, then `<mask>`,
`<2mass>`, `[@BOS@]`, the 99 reserved pieces `<unused0>` … `<unused98>` (ids 7 … 105),
`<start_of_turn>` 106 and `<end_of_turn>` 107, all user-defined pieces, so any special token
string of `t5g.data.vocabulary.SpecialTokens` is one piece here and in Gemma's tokenizer. Then
comes the newline (training reads the corpus line by line, so it would otherwise never be seen),
then 403 pieces learned by BPE. Like Gemma: digits are split, text is not normalised, whitespace
is kept and no dummy prefix is added. Unlike Gemma there is no byte fallback (256 byte pieces
would not fit in 512): characters absent from the corpus encode to unk.
"""

from __future__ import annotations

import hashlib
import io

import sentencepiece as spm

from t5g.data import embedded_corpus
from t5g.data.vocabulary import EMBEDDED_VOCABULARY_PATH

VOCABULARY_SIZE = 512
GEMMA_RESERVED_PIECES = (
    ("<mask>", "<2mass>", "[@BOS@]")
    + tuple(f"<unused{index}>" for index in range(99))
    + ("<start_of_turn>", "<end_of_turn>"))
# corpus_fingerprint() of the corpus the shipped model was trained on (CPython 3.11.7's topics).
SHIPPED_CORPUS_SHA256 = "d816f8d22e0cf35d139a6b91ddbf71926779433fc91cdc3a126e599d8445e57e"


def corpus_fingerprint(documents: list[str]) -> str:
  """The sha256 of the documents (NUL-separated), to tell whether two corpora are the same."""
  return hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()


def train_model(documents: list[str]) -> bytes:
  """The serialized SentencePiece model trained on `documents`."""
  lines = [line for document in documents for line in document.split("\n") if line]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
      vocab_size=VOCABULARY_SIZE, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=list(GEMMA_RESERVED_PIECES) + ["\n"], character_coverage=1.0,
      byte_fallback=False, split_digits=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
  return model.getvalue()


def main() -> None:
  """Rewrites the shipped model from this Python's embedded corpus."""
  documents = embedded_corpus.documents()
  with open(EMBEDDED_VOCABULARY_PATH, "wb") as file:
    file.write(train_model(documents))
  fingerprint = corpus_fingerprint(documents)
  print(f"wrote {EMBEDDED_VOCABULARY_PATH} ({VOCABULARY_SIZE} pieces) from corpus {fingerprint}")
  if fingerprint != SHIPPED_CORPUS_SHA256:
    print(f"this corpus differs from the one recorded: set SHIPPED_CORPUS_SHA256 = "
          f"\"{fingerprint}\" in {__file__}")


if __name__ == "__main__":
  main()
