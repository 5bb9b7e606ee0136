"""Decoding: KV-cached generation for T5Gemma and Gemma 2 (greedy, sampling, beam)."""
