"""Per-edge differences of atom rows, values[senders] - values[receivers]: edge vectors from positions."""

from pallas_kernels.edge_difference.reference import edge_difference_reference

__all__ = ["edge_difference_reference"]
