"""Converters that turn checkpoints in other formats into the plain fp16 Hugging Face folders sparsezip reads."""
