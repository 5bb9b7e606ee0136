"""The SentencePiece vocabulary and the special token strings of the pretraining objectives.

t5g reads Gemma 2's own `tokenizer.model` (pad 0, eos 1, bos 2, unk 3) through
`seqio.SentencePieceVocabulary` with `extra_ids=0`: Gemma has no T5 sentinel ids appended to its
vocabulary. What it has instead are reserved pieces: Gemma 2's tokenizer holds 99 pieces named
`<unused0>` … `<unused98>` (ids 7 … 105 per google-deepmind/gemma's `_Gemma2SpecialTokens`,
whose `CUSTOM = 7` is `<unused0>`; then `<start_of_turn>` 106, `<end_of_turn>` 107). The
embedded vocabulary (`t5g/data/assets/embedded_spm.model`, 512 pieces) holds the same strings
at the same ids, so every special token string below means the same thing in both.

Default choice (`SpecialTokens()`):
- Sentinels: `<unused0>` … `<unused63>`. Noise span k of an example is replaced by sentinel
  k mod 64. At the UL2 lengths of T5Gemma (8192 input tokens) a μ=3, r=0.15 denoiser makes
  about 400 spans, more than the 99 reserved pieces, so sentinels must repeat within a long
  example; spans are matched by order (the j-th sentinel of the inputs opens the j-th span of
  the targets), and a sentinel is never an ordinary text piece. T5's unique-sentinel scheme
  instead counts down from the vocabulary's last id and, past its 100 extra ids, silently turns
  ordinary pieces into sentinels; repeating reserved pieces avoids that.
- Mode tokens (UL2's paradigm tokens `[NLU]`, `[NLG]`, `[S2S]`, which are several pieces in
  Gemma's vocabulary): R `<unused96>`, X `<unused97>`, S `<unused98>`, the last three reserved
  pieces, far from the sentinel block.
- `<unused64>` … `<unused95>` stay free for users' own control tokens.

Checkpoints record the vocabulary their model was trained with (`t5g.checkpoints.model_dir`):
the embedded model by its name, `EMBEDDED_VOCABULARY`, any other by its file. `reference` and
`task_vocabulary` say what to record for a seqio vocabulary or task, `vocabulary_file` which
file a recorded name stands for. seqio and TensorFlow are imported when a vocabulary is loaded,
so that these names cost nothing to the commands that only copy files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from t5g.errors import InputError, MissingFileError
from t5g.model.config import BOS_ID, EMBEDDED_VOCABULARY, EOS_ID, PAD_ID

if TYPE_CHECKING:
  import seqio

EMBEDDED_VOCABULARY_PATH = os.path.join(os.path.dirname(__file__), "assets", "embedded_spm.model")


def get_vocabulary(path: str | None = None) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary at `path` (None: the embedded 512-piece model), no extra ids.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the model's pad/eos/bos ids are not Gemma's 0/1/2.
  """
  import seqio
  import tensorflow as tf
  path = EMBEDDED_VOCABULARY_PATH if path is None else path
  if not tf.io.gfile.exists(path):
    raise MissingFileError(f"SentencePiece vocabulary not found: {path}")
  vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=0)
  processor = vocabulary.tokenizer
  found = (processor.pad_id(), processor.eos_id(), processor.bos_id())
  if found != (PAD_ID, EOS_ID, BOS_ID):
    raise InputError(
        f"{path}: pad/eos/bos ids are {found}; t5g needs Gemma's {(PAD_ID, EOS_ID, BOS_ID)}")
  return vocabulary


def vocabulary_file(reference: str) -> str:
  """The SentencePiece model file a checkpoint's recorded vocabulary stands for: the embedded
  model for EMBEDDED_VOCABULARY, else `reference` itself (a path)."""
  return EMBEDDED_VOCABULARY_PATH if reference == EMBEDDED_VOCABULARY else reference


def reference(vocabulary: Any) -> str | None:
  """What a checkpoint records for a seqio `vocabulary`: EMBEDDED_VOCABULARY for the embedded
  model, the file of another SentencePiece vocabulary without extra ids (as `get_vocabulary`
  makes them), None for any other kind, which t5g's text commands would not read the same way."""
  import seqio
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary) or vocabulary.extra_ids:
    return None
  path = vocabulary.sentencepiece_model_file
  if path == EMBEDDED_VOCABULARY_PATH or (
      os.path.exists(path) and os.path.samefile(path, EMBEDDED_VOCABULARY_PATH)):
    return EMBEDDED_VOCABULARY
  return path


def task_vocabulary(task: Any) -> str | None:
  """The `reference` of the one SentencePiece vocabulary of a seqio task's or mixture's output
  features (a classification task's label feature has none), for its checkpoints to record.

  None, with a warning, when the features have no such vocabulary or several different ones:
  text commands then need --vocabulary.
  """
  import seqio
  found = {name: reference(feature.vocabulary)
           for name, feature in task.output_features.items()
           if isinstance(feature.vocabulary, seqio.SentencePieceVocabulary)}
  references = set(found.values())
  if len(references) == 1 and None not in references:
    return references.pop()
  logging.warning("task %s: its features' vocabularies %s are not one t5g SentencePiece "
                  "vocabulary; its checkpoints record none (text needs --vocabulary)",
                  task.name, found or "(none)")
  return None


def piece_id(vocabulary: seqio.SentencePieceVocabulary, piece: str) -> int:
  """The id of `piece`, which must be exactly one piece of the vocabulary.

  Raises:
    ValueError: `piece` is not a piece of this vocabulary.
  """
  processor = vocabulary.tokenizer
  token_id = processor.piece_to_id(piece)
  if processor.id_to_piece(token_id) != piece:
    raise InputError(
        f"{piece!r} is not a single piece of the vocabulary {vocabulary.sentencepiece_model_file!r}"
        f" ({processor.get_piece_size()} pieces); choose special token strings it contains")
  return token_id


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The sentinel and mode token strings used by the UL2 denoisers (defaults: module docstring).

  Attributes:
    sentinels: noise span k is replaced by `sentinels[k % len(sentinels)]`.
    modes: (mode name, token string) pairs; a `Denoiser`'s `mode` names one of them.
  """

  sentinels: tuple[str, ...] = tuple(f"<unused{index}>" for index in range(64))
  modes: tuple[tuple[str, str], ...] = (
      ("R", "<unused96>"), ("X", "<unused97>"), ("S", "<unused98>"))

  def __post_init__(self):
    if not self.sentinels:
      raise InputError("SpecialTokens needs at least one sentinel string")
    names = [name for name, _ in self.modes]
    if len(set(names)) != len(names):
      raise InputError(f"SpecialTokens mode names repeat: {names}")
    strings = list(self.sentinels) + [token for _, token in self.modes]
    repeated = sorted({token for token in strings if strings.count(token) > 1})
    if repeated:
      raise InputError(f"SpecialTokens strings are used twice: {repeated}")

  def sentinel_ids(self, vocabulary: seqio.SentencePieceVocabulary, n: int) -> list[int]:
    """The ids of the first `n` sentinels.

    Raises:
      ValueError: `n` exceeds the number of sentinels, or a sentinel is not a single piece.
    """
    if not 1 <= n <= len(self.sentinels):
      raise InputError(f"asked for {n} sentinels; SpecialTokens has {len(self.sentinels)}")
    return [piece_id(vocabulary, token) for token in self.sentinels[:n]]

  def mode_id(self, vocabulary: seqio.SentencePieceVocabulary, name: str) -> int:
    """The id of the mode token called `name` (e.g. "R", "X", "S").

    Raises:
      ValueError: no mode has that name, or its string is not a single piece.
    """
    tokens = dict(self.modes)
    if name not in tokens:
      raise InputError(f"unknown mode {name!r}; SpecialTokens has modes {sorted(tokens)}")
    return piece_id(vocabulary, tokens[name])
