"""sparsezip: float sparsity plus lossless compression for LLM weights (W16A16S / W16A16SC)."""

__version__ = "0.1.0"
