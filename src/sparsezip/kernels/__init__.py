"""Native kernels, split by target: `cpu/` (one C extension with run-time ISA dispatch) and `triton/` (GPU).

Every kernel is checked against a reference (the numpy codec, torch). Kernel modules are imported lazily by their
users, so a missing optional piece (the C extension, triton) never breaks import.
"""
