"""Optional fast paths for compressed weights (Triton on GPU, native CPU), chosen by availability.

Every kernel here is checked against the reference decoder in sparsezip.codec. Kernel modules are
imported lazily by their users, so a missing optional dependency (e.g. triton) never breaks import.
"""
