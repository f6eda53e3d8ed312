"""Training batches from a dataset, on grain: seeded shuffles per epoch, size buckets, sharding by process.

Structures are put in buckets by atom count (`neighbours.round_up`: 2^k or 3·2^(k-1) atoms, so a structure
pads by less than half); every bucket has one padded batch shape, so jit sees one shape per bucket however
long training runs (`Loader.shapes` lists them up front; `shapes_seen` what was produced).

An epoch is a function of (seed, epoch) only: each bucket's structures are permuted and cut into batches
(the last one of a bucket may be short: it is padded, so every structure is seen exactly once per epoch), and
the batches of all buckets are permuted together. Batch b of the epoch goes to process b mod P
(`jax.process_index()` / `jax.process_count()` by default); a process that has one batch fewer than the others
gets an empty (all padding) batch at the end of the epoch, so all processes take the same number of steps.
Step s of a process is batch s mod steps_per_epoch of epoch s div steps_per_epoch: the loader is random
access in the step (a grain MapDataset over steps), so a resumed run starts its iterator at its step and sees
exactly the batches the uninterrupted run would have seen.

Batches are padded graphs without edges (`distiller.batch.pad_structures`, with labels): the training step
builds the neighbour list inside jit, on the device, where it costs little and its capacity is handled like
every other static size.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import numpy as np

from distiller import neighbours as nl
from distiller.batch import Batch, BatchShape, bucket_shape, pad_structures
from distiller.data.dataset import Dataset, DatasetError
from distiller.reference import ReferenceEnergies


class Loader:
    """Padded, labelled batches of `dataset` for training; see the module docstring for the order.

    `batch_size` structures per batch at most; with `max_atoms`, fewer for large structures (at least one),
    so that a batch holds at most about `max_atoms` atoms. `indices` restricts the loader to a subset of the
    dataset (e.g. a training split). `reference`: the batches' energies are relative to it (distiller.reference).
    `hvp` = K: batches also carry the structures' K stored directions and H·v ((K, A, 3), `distiller label --hvp
    K`), for the HVP loss term.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, max_atoms: int | None = None,
                 indices: Sequence[int] | None = None, process_index: int | None = None,
                 process_count: int | None = None, threads: int = 4, prefetch: int = 16,
                 require_labels: bool = True, reference: ReferenceEnergies | None = None, hvp: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process {process_index} of {process_count}")
        self.dataset = dataset
        self.batch_size, self.seed, self.max_atoms = batch_size, seed, max_atoms
        self.process_index, self.process_count = process_index, process_count
        self.threads, self.prefetch, self.require_labels = threads, prefetch, require_labels
        self.reference, self.hvp = reference, hvp
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
        if self.indices.size == 0:
            raise ValueError(f"{dataset.path}: no structures to load")
        sizes = np.asarray(dataset.n_atoms)[self.indices]
        bucket_of = np.array([nl.round_up(int(n)) for n in sizes])
        # Bucket b: its atom bound, its members (fixed order), structures per batch and the padded shape.
        self.buckets = sorted(set(bucket_of.tolist()))
        self._members = [self.indices[bucket_of == b] for b in self.buckets]
        self.shapes = [bucket_shape(b, self.batch_size, self.max_atoms) for b in self.buckets]
        self._per_batch = [shape.graphs - 1 for shape in self.shapes]
        batches = sum(-(-len(m) // g) for m, g in zip(self._members, self._per_batch))
        self.batches_per_epoch = batches  # over all processes
        self.steps_per_epoch = -(-batches // process_count)
        self.shapes_seen: set[BatchShape] = set()
        self._lock = threading.Lock()
        self._epochs: dict[int, list[tuple[int, np.ndarray]]] = {}

    # -- the order ------------------------------------------------------------------------------------
    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """This process's batches of `epoch`: (bucket, dataset indices) each; empty indices for a filler."""
        with self._lock:  # grain's threads ask for the same epoch at once; compute it once
            if epoch not in self._epochs:
                if len(self._epochs) >= 4:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = self._plan_epoch(epoch)
            return self._epochs[epoch]

    def _plan_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b, (members, g) in enumerate(zip(self._members, self._per_batch)):
            order = rng.permutation(members)
            batches += [(b, order[k:k + g]) for k in range(0, len(order), g)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        mine = batches[self.process_index::self.process_count]
        mine += [(0, np.zeros(0, np.int64))] * (self.steps_per_epoch - len(mine))
        return mine

    def plan(self, step: int) -> tuple[int, np.ndarray]:
        """(bucket, dataset indices) of this process's batch at `step`."""
        if step < 0:
            raise IndexError(f"step {step}")
        return self.epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]

    # -- batches --------------------------------------------------------------------------------------
    def batch(self, step: int) -> Batch:
        """The padded batch (numpy arrays, no edges) of `step`."""
        bucket, indices = self.plan(step)
        structures = self.dataset.get(indices) if len(indices) else []
        if self.require_labels:
            for s in structures:
                if s.energy is None or s.forces is None:
                    raise DatasetError(f"{self.dataset.path}: structure '{s.name}' has no energy or forces labels")
                if self.hvp and (s.hvp is None or len(s.hvp) != self.hvp):
                    raise DatasetError(f"{self.dataset.path}: structure '{s.name}' has no {self.hvp} Hessian-vector "
                                       f"products")
        shape = self.shapes[bucket]
        self.shapes_seen.add(shape)
        return pad_structures(structures, shape, self.reference, hvp=self.hvp)

    def grain_dataset(self, start: int = 0, stop: int | None = None):
        """grain MapDataset of the batches of steps [start, stop) (stop: the end of the epoch of `start`)."""
        import grain

        stop = (start // self.steps_per_epoch + 1) * self.steps_per_epoch if stop is None else stop
        return grain.MapDataset.source(range(start, stop)).map(self.batch)

    def iterator(self, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Batches of steps start, start+1, ... (up to `stop`), read and padded ahead by grain's threads."""
        import grain

        if stop is None:
            stop = start + 1_000_000_000  # training stops when it is done; epochs never run out
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        return iter(self.grain_dataset(start, stop).to_iter_dataset(options))

    def report(self) -> dict:
        return {"structures": int(self.indices.size), "buckets_atoms": self.buckets,
                "structures_per_batch": self._per_batch, "steps_per_epoch": self.steps_per_epoch,
                "shapes": [list(s) for s in self.shapes], "shapes_seen": sorted(list(s) for s in self.shapes_seen),
                "process": [self.process_index, self.process_count]}
