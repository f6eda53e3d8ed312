"""Continuous-filter convolution: the plain-JAX reference and a dispatcher over implementations."""

from pallas_kernels.cfconv.dispatch import KERNELS, cfconv, check_kernel
from pallas_kernels.cfconv.reference import (ENVELOPE_EXPONENT, cfconv_reference, envelope, radial_basis,
                                             radial_filter, rbf_centers)

__all__ = ["KERNELS", "cfconv", "check_kernel", "cfconv_reference", "envelope", "radial_basis", "radial_filter",
           "rbf_centers", "ENVELOPE_EXPONENT"]
