"""Evaluation: seqio evaluators over decoding and scoring, classification fine-tuning."""
