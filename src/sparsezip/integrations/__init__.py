"""sparsezip inside the tools people already use.

- `hf_quantizer`: a transformers quantizer, so `AutoModelForCausalLM.from_pretrained` loads W16A16S/W16A16SC
  folders with our weight layouts inside the linears. Registered by `register_on_import` below.
- `lm_eval_model`: an lm-evaluation-harness LM backed by our runtime (`lm_eval --model sparsezip`).
- `vllm`: a vLLM plugin (entry point `vllm.general_plugins`), found by vLLM itself.

Nothing here is imported by the rest of sparsezip; each module imports its tool only when it is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"  # where transformers keeps its quantizer tables


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers our quantizer right after transformers imports its quantizer tables.

    Importing transformers takes seconds, and `import sparsezip` (every CLI command) must stay instant, so the
    registration waits for transformers to be imported by whoever needs it, in any order.
    """

    def find_spec(self, name, path, target=None):
        if name != TRANSFORMERS_REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_then_register(module):
            run_module(module)
            register_transformers()

        spec.loader.exec_module = exec_then_register
        return spec


def register_transformers() -> None:
    # importing the module registers it (its last line); a plain import also works while that module is the one
    # importing transformers, which runs this hook before the module has finished
    importlib.import_module(f"{__name__}.hf_quantizer")


def register_on_import() -> None:
    """Make transformers know quant_method "sparsezip", now if its tables are loaded, else when they are."""
    if TRANSFORMERS_REGISTRY in sys.modules:
        register_transformers()
    elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenImported())
