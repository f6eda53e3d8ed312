"""PaiNN's message (scalar, vector and along-the-edge cfconv sums): the plain-JAX reference and the fused kernel."""

from pallas_kernels.directional_cfconv.reference import directional_cfconv_reference, edge_lengths_and_units

__all__ = ["directional_cfconv_reference", "edge_lengths_and_units"]
