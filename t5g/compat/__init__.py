"""Interoperability with other formats: Hugging Face folders (safetensors + config.json)."""
