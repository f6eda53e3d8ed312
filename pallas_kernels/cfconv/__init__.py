"""Continuous-filter convolution: the plain-JAX reference and a dispatcher over implementations."""

from pallas_kernels.cfconv.dispatch import KERNELS, cfconv, check_kernel
from pallas_kernels.cfconv.reference import (ENVELOPE_EXPONENT, MIN_BASIS, cfconv_reference, cubic_bspline,
                                             envelope, radial_filter, spline_basis, spline_spacing)

__all__ = ["KERNELS", "cfconv", "check_kernel", "cfconv_reference", "cubic_bspline", "envelope", "radial_filter",
           "spline_basis", "spline_spacing", "ENVELOPE_EXPONENT", "MIN_BASIS"]
