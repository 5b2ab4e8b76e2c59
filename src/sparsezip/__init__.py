"""sparsezip: float sparsity plus lossless compression for LLM weights (W16A16S / W16A16SC)."""

__version__ = "0.1.0"

from .integrations import register_on_import

register_on_import()  # transformers' from_pretrained then loads W16A16S/W16A16SC folders (integrations/hf_quantizer)
