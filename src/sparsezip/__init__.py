"""sparsezip: float sparsity plus lossless compression for LLM weights (W16A16S / W16A16SC)."""

__version__ = "0.1.0"

# How `run`/`eval`/`chat`/`serve` hold linear weights (runtime.load_model); here so the CLI can list them
# without importing torch.
WEIGHT_MODES = ("dense", "sparse", "compressed")
