"""Hand-written accelerator kernels for distiller's hot edge updates.

Each kernel lives in its own package beside a plain-JAX reference with the same signature; the reference
is the definition (and the CPU path), the kernel is only ever a faster way to compute the same numbers.
`dispatch` names the sets: kernel="xla" (the references) or "pallas".
"""

from pallas_kernels.dispatch import (KERNELS, Kernels, cfconv, check_kernel, directional_cfconv, edge_difference,
                                     pallas_set)

__all__ = ["KERNELS", "Kernels", "cfconv", "check_kernel", "directional_cfconv", "edge_difference", "pallas_set"]
