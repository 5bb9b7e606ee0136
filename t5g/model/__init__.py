"""Flax (linen) Gemma 2 and T5Gemma models, their configs and presets."""

from t5g.model.config import (BOS_ID, EOS_ID, PAD_ID, ComputeConfig, EncoderDecoderConfig,
                              ModelConfig, StackConfig)
from t5g.model.models import (Gemma2, T5Gemma, abstract_params, init_params, make_model)
from t5g.model.presets import PRESETS, get_preset
