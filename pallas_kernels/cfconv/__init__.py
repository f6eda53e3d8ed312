"""Continuous-filter convolution: the plain-JAX reference (the definition) and the fused Pallas kernels."""

from pallas_kernels.cfconv.reference import (ENVELOPE_EXPONENT, MIN_BASIS, cfconv_reference, cubic_bspline,
                                             envelope, radial_filter, spline_basis, spline_spacing)

__all__ = ["cfconv_reference", "cubic_bspline", "envelope", "radial_filter", "spline_basis", "spline_spacing",
           "ENVELOPE_EXPONENT", "MIN_BASIS"]
