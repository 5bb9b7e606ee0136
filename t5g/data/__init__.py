"""Data: the vocabulary, the pretraining objectives, seqio tasks, mixtures and feature conversion."""
