"""seqio feature converters that emit exactly the inputs of `t5g.model.models`.

Task features (`inputs`, `targets`) become model features:

- `EncDecFeatureConverter` (T5Gemma): `encoder_input_tokens`, `decoder_input_tokens`,
  `decoder_target_tokens`, `decoder_loss_weights`, plus `encoder_segment_ids`,
  `encoder_positions`, `decoder_segment_ids`, `decoder_positions` when packed.
- `LMFeatureConverter` (Gemma 2, targets only) and `PrefixLMFeatureConverter` (Gemma 2, inputs
  and targets concatenated, loss on the targets): `decoder_input_tokens`,
  `decoder_target_tokens`, `decoder_loss_weights`, plus `decoder_segment_ids`,
  `decoder_positions` when packed.

How they differ from seqio's converters of the same names:

- Every decoder segment starts with BOS (id 2), T5Gemma's decoder start token and the token
  Gemma 2 was trained to see first; seqio's default is 0 (T5's pad-as-start).
- Decoder inputs are 0 wherever the target is padding. seqio leaves the shifted-in EOS (and,
  with a non-zero BOS, a start token) in the first padding slot; zeroing them makes
  `decoder_input_tokens != 0` mark exactly the real positions, which is what the models assume
  when no segment ids are given.
- Packing an encoder-decoder example with empty `inputs` or `targets` is an error: seqio numbers
  the segments of each feature on its own, so such an example would pair every later decoder
  segment of its row with the wrong encoder segment.

Encoder inputs are passed through unchanged: like Google's T5Gemma sampler, no BOS is added to
the encoder side.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from t5g.model.config import BOS_ID

_DECODER_INPUTS = "decoder_input_tokens"
_DECODER_TARGETS = "decoder_target_tokens"
_PREFIX_MASK = "decoder_causal_attention"


def _zero_inputs_on_padding(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Sets decoder input tokens to 0 where the decoder target is padding (0)."""
  is_real = tf.not_equal(features[_DECODER_TARGETS], 0)
  features[_DECODER_INPUTS] = tf.where(is_real, features[_DECODER_INPUTS],
                                       tf.zeros_like(features[_DECODER_INPUTS]))
  return features


class EncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """Encoder-decoder conversion for T5Gemma: BOS-started decoder segments, packing optional.

  pack: concatenate several examples per row (adds segment ids and positions); otherwise each
  example is padded to the task feature lengths. Examples longer than the lengths are trimmed
  by seqio before packing, so tasks should produce examples that fit.
  """

  def __init__(self, pack: bool = True, use_custom_packing_ops: bool = False):
    super().__init__(pack=pack, use_custom_packing_ops=use_custom_packing_ops, bos_id=BOS_ID)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """seqio's conversion, then decoder inputs zeroed on target padding."""
    return _zero_inputs_on_padding(dict(super()._convert_example(features)))

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """seqio's conversion; when packing, first checks that no example has an empty feature."""
    if self.pack:
      ds = ds.map(_assert_not_empty, num_parallel_calls=tf.data.AUTOTUNE)
    return super()._convert_features(ds, task_feature_lengths)


def _assert_not_empty(features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
  checks = [tf.debugging.assert_positive(
      tf.size(features[name]),
      message=f"an example with no {name} token cannot be packed for the encoder-decoder")
      for name in ("inputs", "targets")]
  with tf.control_dependencies(checks):
    return tf.nest.map_structure(tf.identity, dict(features))


class LMFeatureConverter(seqio.LMFeatureConverter):
  """Decoder-only conversion of a `targets`-only task (Gemma 2 teacher and baselines).

  The decoder input is `[BOS, t_0, ..., t_{n-2}]` for targets `[t_0, ..., t_{n-1}]`, as Gemma 2
  reads text after its BOS; the loss covers every target token.
  """

  def __init__(self, pack: bool = True, use_custom_packing_ops: bool = False):
    super().__init__(pack=pack, use_custom_packing_ops=use_custom_packing_ops, bos_id=BOS_ID)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """seqio's conversion, then decoder inputs zeroed on target padding."""
    return _zero_inputs_on_padding(dict(super()._convert_example(features)))


class PrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
  """Decoder-only conversion of an `inputs`/`targets` task: one causal sequence `inputs + targets`.

  The decoder input is `[BOS] + inputs + targets[:-1]`; the loss covers the targets only
  (`loss_on_targets_only=False` puts it on every token). Gemma 2 attends causally everywhere,
  so seqio's `decoder_causal_attention` prefix mask is not emitted. Over the same examples, the
  loss-weighted positions predict the same tokens, in the same order, as an
  `EncDecFeatureConverter` batch's decoder targets: a Gemma 2 teacher's logits there can
  supervise the T5Gemma decoder.
  """

  MODEL_FEATURES = {name: spec for name, spec in
                    seqio.PrefixLMFeatureConverter.MODEL_FEATURES.items()
                    if name != _PREFIX_MASK}

  def __init__(self, pack: bool = True, loss_on_targets_only: bool = True,
               use_custom_packing_ops: bool = False):
    super().__init__(loss_on_targets_only=loss_on_targets_only, pack=pack,
                     use_custom_packing_ops=use_custom_packing_ops, bos_id=BOS_ID)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """seqio's prefix-LM conversion without the prefix mask, decoder inputs zeroed on padding."""
    converted = dict(super()._convert_example(features))
    del converted[_PREFIX_MASK]
    return _zero_inputs_on_padding(converted)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """Every model feature has length len(inputs) + len(targets)."""
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    del lengths[_PREFIX_MASK]
    return lengths
