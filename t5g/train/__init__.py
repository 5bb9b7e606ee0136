"""Training: FLOP accounting and the training loop."""
