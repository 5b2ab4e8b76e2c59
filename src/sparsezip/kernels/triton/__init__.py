"""GPU kernels written in Triton (checked on the CPU under TRITON_INTERPRET=1 at small shapes)."""
