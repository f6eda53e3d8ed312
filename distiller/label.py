"""Labelling jobs: a teacher's energies, forces, stress and ensemble spread for a set of structures, as a dataset.

    distiller label --teacher fennol-pmc:ani1x --structures samples.extxyz --out data/ani [--shard 3/16]

The structures of shard i/n are those with index k = i (mod n) in the job's input (files and datasets, in the
order given). A shard labels its structures sorted by atom count (ties by index), `chunk` at a time, so that
each teacher call sees structures of similar size; every chunk is committed atomically as one part file of the
dataset (see distiller.data.dataset). A job killed at any point and restarted with the same command skips the
committed chunks: it loses at most the chunk in flight and duplicates nothing. n processes (a SLURM array)
can label one set into one directory, or into several that `distiller label --merge` gathers.

Any teacher of the `Teacher` protocol labels through its `label`. A JAX teacher with `apply_with_stress`
(FeNNol) is called directly instead: padded batches of a few bucketed shapes, capacities kept between chunks
(saved with every commit, so a restarted job pads exactly as the uninterrupted one would have and gives the
same numbers), and the ensemble's energy spread.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from distiller import neighbours as nl
from distiller.batch import (BatchShape, allocate_neighbours, bucket_shape, pad_structures, unpad_atoms,
                            with_neighbours)
from distiller.data.dataset import Dataset, ShardWriter, is_dataset, merge_datasets, open_dataset
from distiller.files import sha256
from distiller.structure import Structure, StructureError, read_structures


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


# --------------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """The job's input structures, from structure files (read whole) and datasets (read chunk by chunk)."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        if not paths:
            raise ValueError("labelling needs at least one structure file or dataset")
        # The job's identity: names and checksums, not absolute paths, so that shards labelled on machines
        # that keep the inputs in different places still merge.
        self.sources: list[dict] = []
        self.paths = [os.path.abspath(p) for p in paths]
        self._parts: list[list[Structure] | Dataset] = []
        sizes = []
        for path in map(os.fspath, paths):
            if is_dataset(path):
                dataset = open_dataset(path)
                # A dataset's identity: the checksums of its files.
                digest = hashlib.sha256("".join(p.sha256 for p in dataset.parts).encode()).hexdigest()
                self._parts.append(dataset)
                sizes.append(dataset.n_atoms)
                self.sources.append({"file": os.path.basename(os.path.normpath(path)), "kind": "dataset",
                                     "sha256": digest, "structures": len(dataset)})
            else:
                structures = read_structures(path)
                self._parts.append(structures)
                sizes.append(np.array([s.n_atoms for s in structures], np.int64))
                self.sources.append({"file": os.path.basename(path), "kind": "file", "sha256": sha256(path),
                                     "structures": len(structures)})
        self.n_atoms = np.concatenate(sizes)
        self._offsets = np.cumsum([0] + [len(s) for s in sizes])

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    def get(self, indices: Sequence[int]) -> list[Structure]:
        indices = np.asarray(indices, np.int64)
        which = np.searchsorted(self._offsets, indices, side="right") - 1
        out: list[Structure | None] = [None] * len(indices)
        for p in np.unique(which):
            where = np.flatnonzero(which == p)
            local = (indices[where] - self._offsets[p]).tolist()
            part = self._parts[p]
            # Files were validated when read; a dataset's structures are validated here, as they come in.
            got = [x.validated() for x in part.get(local)] if isinstance(part, Dataset) else [part[k] for k in local]
            for j, k, s in zip(where, local, got):
                info = {key: v for key, v in s.info.items() if key != "energy_spread"}  # a previous teacher's
                info.setdefault("source", {"path": self.paths[p], "index": k})
                out[j] = s.replace(info=info)
        return out  # type: ignore[return-value]

    def in_memory(self) -> list[Structure] | None:
        """All structures, if no dataset is among the inputs (then they can be checked up front)."""
        if any(isinstance(p, Dataset) for p in self._parts):
            return None
        return [s for p in self._parts for s in p]


def shard_chunks(n_atoms: np.ndarray, shard: int, shards: int, chunk: int) -> list[list[int]]:
    """The chunks of shard i/n: its indices (k = i mod n) sorted by (atom count, index), `chunk` at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    members = np.arange(shard, len(n_atoms), shards)
    members = members[np.lexsort((members, n_atoms[members]))]
    return [members[k:k + chunk].tolist() for k in range(0, len(members), chunk)]


# --------------------------------------------------------------------------------------------------
# Labellers


def _checked(teacher_spec: str, structures: Sequence[Structure], labelled: Sequence[Structure]) -> list[Structure]:
    """Refuse labels that cannot be right: a missing structure, wrong shapes, non-finite numbers."""
    if len(labelled) != len(structures):
        raise RuntimeError(f"teacher {teacher_spec} returned {len(labelled)} structures for {len(structures)}")
    for s, t in zip(structures, labelled):
        problem = None
        if t.energy is None or not np.isfinite(t.energy):
            problem = f"energy {t.energy}"
        elif t.forces is None or np.shape(t.forces) != (s.n_atoms, 3) or not np.all(np.isfinite(t.forces)):
            problem = "missing, misshapen or non-finite forces"
        elif t.stress is not None and (np.shape(t.stress) != (3, 3) or not np.all(np.isfinite(t.stress))):
            problem = "misshapen or non-finite stress"
        elif t.n_atoms != s.n_atoms or not np.array_equal(t.numbers, s.numbers):
            problem = "a different structure back"
        if problem:
            raise StructureError(f"structure '{s.name}': teacher {teacher_spec} gave {problem}")
    return list(labelled)


class HostLabeller:
    """Any teacher: its own `label` (Orb, ASE calculators...). Spread only if the teacher puts
    `info["energy_spread"]` on its results."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.shapes_seen: set = set()
        self.grown = 0

    def __call__(self, structures: Sequence[Structure]) -> list[Structure]:
        return _checked(self.teacher.spec, structures, self.teacher.label(list(structures)))

    def state(self) -> bytes | None:
        return None

    def restore(self, state: bytes | None) -> None:
        pass


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _teacher_labels(teacher, params, batch, nl_capacity, teacher_capacity):
    """Neighbour list and the teacher's energy, forces, stress in one XLA program."""
    batch, neighbours = with_neighbours(batch, teacher.cutoff, nl_capacity)
    out, stress = teacher.apply_with_stress(params, batch, teacher_capacity)
    return out, stress, neighbours.overflow, neighbours.needed


@functools.partial(jax.jit, static_argnums=(1, 2))
def _with_edges(batch, cutoff, capacity):
    return with_neighbours(batch, cutoff, capacity)[0]


class JaxLabeller:
    """A JAX teacher with `apply_with_stress(params, batch, capacity)`, `capacity_for` and `grow` (FeNNol).

    A chunk's structures are put in size buckets (`neighbours.round_up` of their atom count) and cut into
    batches of at most `max_atoms` atoms, padded to one shape per bucket (it depends only on the bucket and
    the job's chunk size), so jit compiles once per size bucket. Capacities (neighbour list, teacher
    preprocessing) are kept per shape and only grow.
    """

    def __init__(self, teacher, params, chunk: int, max_atoms: int = 4096):
        self.teacher, self.params = teacher, params
        self.chunk, self.max_atoms = chunk, max_atoms
        self.capacities: dict[BatchShape, tuple[nl.NeighbourCapacity, Any]] = {}
        self.ensemble = int(getattr(teacher, "n_members", 1)) > 1
        self.shapes_seen: set[BatchShape] = set()
        self.grown = 0  # capacity growths (each one a recompilation), for the job's summary

    def shape(self, largest: int) -> BatchShape:
        return bucket_shape(nl.round_up(largest), self.chunk, self.max_atoms)

    def __call__(self, structures: Sequence[Structure]) -> list[Structure]:
        # A chunk straddling two size buckets (the job sorts by size) is labelled bucket by bucket, so
        # small structures are not padded to the large ones' shape.
        buckets = np.array([nl.round_up(s.n_atoms) for s in structures])
        out: list[Structure | None] = [None] * len(structures)
        for bucket in np.unique(buckets):
            members = np.flatnonzero(buckets == bucket)
            group = [structures[k] for k in members]
            shape = self.shape(bucket)
            self.shapes_seen.add(shape)
            step = shape.graphs - 1
            # Every batch of the group is dispatched before the first result is read, so the host pads the
            # next batches while the device computes (JAX dispatches asynchronously).
            pending = [self._dispatch(group[k:k + step], shape) for k in range(0, len(group), step)]
            for start, flight in zip(range(0, len(group), step), pending):
                labelled = self._collect(group[start:start + step], shape, *flight)
                for k, s in zip(members[start:start + step], labelled):
                    out[k] = s
        return _checked(self.teacher.spec, structures, out)

    def _capacity(self, shape: BatchShape, batch) -> tuple[nl.NeighbourCapacity, Any]:
        """The shape's capacities, measured on this batch the first time the shape is seen."""
        if shape not in self.capacities:
            cutoff = float(self.teacher.cutoff)
            nl_capacity = allocate_neighbours(batch, cutoff)
            self.capacities[shape] = (nl_capacity, self.teacher.capacity_for(_with_edges(batch, cutoff, nl_capacity)))
        return self.capacities[shape]

    def _dispatch(self, group: list[Structure], shape: BatchShape):
        batch = jax.tree_util.tree_map(jnp.asarray, pad_structures(group, shape))
        nl_capacity, teacher_capacity = self._capacity(shape, batch)
        return batch, _teacher_labels(self.teacher, self.params, batch, nl_capacity, teacher_capacity)

    def _collect(self, group: list[Structure], shape: BatchShape, batch, flight) -> list[Structure]:
        """The batch's labels; if a capacity overflowed, grow it (from the shape's current capacities, which
        earlier batches may have grown already) and compute the batch again."""
        result, stress, nl_overflow, needed = flight
        cutoff = float(self.teacher.cutoff)
        for _ in range(8):  # each retry grows a capacity to what the batch measured; a few at most
            if not bool(nl_overflow) and not bool(result.overflow):
                break
            nl_capacity, teacher_capacity = self.capacities[shape]
            if bool(nl_overflow):
                nl_capacity = nl.grow(nl_capacity, np.asarray(needed))
            # Measured on the complete edges, the teacher's capacity grows in the same go (one recompilation).
            teacher_capacity = self.teacher.grow(teacher_capacity, _with_edges(batch, cutoff, nl_capacity))
            self.capacities[shape] = (nl_capacity, teacher_capacity)
            self.grown += 1
            result, stress, nl_overflow, needed = _teacher_labels(self.teacher, self.params, batch, nl_capacity,
                                                                  teacher_capacity)
        else:
            raise RuntimeError(f"teacher {self.teacher.spec}: capacities still overflow after growing "
                               f"{self.capacities[shape]}")
        energy = np.asarray(result.energy, np.float64)
        spread = np.asarray(result.energy_spread, np.float64)
        stress = np.asarray(stress, np.float64)
        forces = unpad_atoms(batch, np.asarray(result.forces, np.float64))
        out = []
        for g, s in enumerate(group):
            info = {**s.info, "energy_spread": float(spread[g])} if self.ensemble else s.info
            out.append(s.replace(energy=float(energy[g]), forces=forces[g], stress=stress[g] if s.periodic else None,
                                 info=info))
        return out

    def state(self) -> bytes:
        return pickle.dumps(self.capacities)

    def restore(self, state: bytes | None) -> None:
        if state is not None:
            self.capacities = pickle.loads(state)


def labeller_for(teacher, params, chunk: int, max_atoms: int = 4096):
    if params is not None and all(hasattr(teacher, a) for a in ("apply_with_stress", "capacity_for", "grow")):
        return JaxLabeller(teacher, params, chunk, max_atoms)
    return HostLabeller(teacher)


# --------------------------------------------------------------------------------------------------
# The job


def _teacher(teacher) -> tuple[Any, Any]:
    if isinstance(teacher, str):
        from distiller.teachers.registry import load_teacher

        return load_teacher(teacher)
    if isinstance(teacher, tuple):
        return teacher
    return teacher, getattr(teacher, "params", None)


def label_dataset(teacher, structures: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  shard: tuple[int, int] = (0, 1), chunk: int = 64, max_atoms: int = 4096,
                  progress: bool = True) -> dict:
    """Label shard `shard` = (i, n) of the structures in `structures` (files and datasets) into dataset `out`.

    `teacher` is a spec ("fennol-pmc:ani1x"), a (teacher, params) pair or a teacher. Resumes a killed job.
    Returns a summary: structures of the shard, how many were labelled now, time, rate, batch shapes, and
    whether the dataset is complete (the last shard to finish writes its metadata.json).
    """
    i, n = shard
    out = os.fspath(out)
    teacher, params = _teacher(teacher)
    inputs = Inputs(structures)
    everything = inputs.in_memory()
    if everything is not None:  # fail before labelling anything, naming the bad structure
        teacher.check(everything)
    chunks = shard_chunks(inputs.n_atoms, i, n, chunk)
    job = {"teacher": teacher.spec, "teacher_class": type(teacher).__name__, "sources": inputs.sources,
           "structures": len(inputs), "chunk": chunk, "shards": n,
           "shard_sizes": [len(range(s, len(inputs), n)) for s in range(n)]}
    labeller = labeller_for(teacher, params, chunk, max_atoms)
    t0 = time.perf_counter()
    labelled_now = 0
    with ShardWriter(out, job, i, n) as writer:
        labeller.restore(writer.state)
        done = writer.committed_chunks
        skipped = sum(len(c) for k, c in enumerate(chunks) if k in done)
        bar = tqdm(total=sum(map(len, chunks)), initial=skipped, disable=not progress, unit="structure",
                   desc=f"label {i}/{n}", dynamic_ncols=True)
        for k, indices in enumerate(chunks):
            if k in done:
                continue
            structures = inputs.get(indices)
            if everything is None:  # datasets among the inputs: checked chunk by chunk
                teacher.check(structures)
            labels = labeller(structures)
            writer.commit(k, labels, indices, labeller.state())
            labelled_now += len(indices)
            bar.update(len(indices))
        bar.close()
        complete = writer.finish()
    seconds = time.perf_counter() - t0
    return {"out": out, "shard": f"{i}/{n}", "teacher": teacher.spec, "structures": sum(map(len, chunks)),
            "labelled": labelled_now, "resumed_from": skipped, "seconds": round(seconds, 3),
            "structures_per_second": round(labelled_now / seconds, 3) if labelled_now else None,
            "shapes": sorted([list(s) for s in labeller.shapes_seen]), "capacity_growths": labeller.grown,
            "dataset_complete": complete}


def merge(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """`distiller label --merge`: one dataset from the shard directories of one job."""
    dataset = merge_datasets(inputs, out)
    return {"out": os.fspath(out), "structures": len(dataset), "files": len(dataset.parts),
            "teacher": dataset.teacher}
