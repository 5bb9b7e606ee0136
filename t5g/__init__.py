"""t5g: encoder-decoder Gemma (T5Gemma) by adaptation from Gemma 2, in JAX/Flax."""

__version__ = "0.1.0"
