"""What the fused edge kernels share: the edge list in receiver and sender order (`graph`) and the one
differentiable Pallas edge pass (`edge_op`)."""
