"""`python -m sparsezip` and `torchrun -m sparsezip`."""

from .cli import run_as_process

run_as_process()
