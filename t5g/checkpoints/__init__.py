"""Checkpoint storage: the self-describing t5g (Orbax) checkpoint directory."""
