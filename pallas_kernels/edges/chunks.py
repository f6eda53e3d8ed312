"""Wide features in chunks: a channelwise edge operation on F features is the same operation on each slice.

cfconv and PaiNN's message are channelwise: output column f depends on input column f and filter column f
alone (and on the shared edge vectors). A kernel holds its block's rows on chip, so a wide one spills: PaiNN
128x3's message was 2.2x slower than its XLA twin in MD at 12,000 atoms (bench/results/md-speed-h100-accurate.json,
launch settings tuned at 64 features). Above FEATURE_CHUNK features the entry points therefore launch the
kernel once per chunk of at most FEATURE_CHUNK columns, each at the tuned width, sharing one edge graph; JAX sums
the chunks' edge-vector cotangents, so derivatives of every order are those of the unsplit operation.
"""

from __future__ import annotations

FEATURE_CHUNK = 64  # the width the launch settings were tuned at (bench/results/kernels-sweep-h200.json)


def feature_chunks(n_features: int, chunk: int = FEATURE_CHUNK) -> list[slice]:
    """[slice(0, chunk), slice(chunk, 2 chunk), ...] covering n_features columns; one slice if it fits."""
    if chunk < 1:
        raise ValueError(f"feature chunk must be >= 1, got {chunk}")
    return [slice(a, min(a + chunk, n_features)) for a in range(0, n_features, chunk)]
