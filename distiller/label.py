"""Labelling jobs: a teacher's energies, forces, stress and ensemble spread for a set of structures, as a dataset.

    distiller label --teacher fennol-pmc:ani1x --structures samples.extxyz --out data/ani [--shard 3/16]

The structures of shard i/n are those with index k = i (mod n) in the job's input (files and datasets, in the
order given). A shard labels its structures sorted by atom count (ties by index), `chunk` at a time, so that
each teacher call sees structures of similar size; every chunk is committed atomically as one part file of the
dataset (see distiller.data.dataset). A job killed at any point and restarted with the same command skips the
committed chunks: it loses at most the chunk in flight and duplicates nothing. n processes (a SLURM array)
can label one set into one directory, or into several that `distiller label --merge` gathers.

Any energy model labels through one `distiller.predict.Predictor`: JAX teachers (FeNNol) in padded batches of a
few bucketed shapes, capacities kept between chunks (saved with every commit, so a restarted job pads exactly
as the uninterrupted one would have and gives the same numbers), with the ensemble's energy spread; host-only
teachers (Orb, ASE calculators) through their own `label`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from distiller.capacity import Capacity
from distiller.data.dataset import Dataset, ShardWriter, is_dataset, merge_datasets, open_dataset
from distiller.files import sha256
from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.structure import Structure, read_structures


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
# The job


def label_dataset(teacher: EnergyModel | str, structures: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  shard: tuple[int, int] = (0, 1), chunk: int = 64, max_atoms: int = 4096,
                  progress: bool = True) -> dict:
    """Label shard `shard` = (i, n) of the structures in `structures` (files and datasets) into dataset `out`.

    `teacher` is an EnergyModel or a teacher spec ("fennol-pmc:ani1x"). Resumes a killed job.
    Returns a summary: structures of the shard, how many were labelled now, time, rate, batch shapes, and
    whether the dataset is complete (the last shard to finish writes its metadata.json).
    """
    i, n = shard
    out = os.fspath(out)
    teacher = as_model(teacher)
    inputs = Inputs(structures)
    everything = inputs.in_memory()
    if everything is not None:  # fail before labelling anything, naming the bad structure
        teacher.check(everything)
    chunks = shard_chunks(inputs.n_atoms, i, n, chunk)
    job = {"teacher": teacher.name, "teacher_class": type(teacher.source).__name__, "sources": inputs.sources,
           "structures": len(inputs), "chunk": chunk, "shards": n,
           "shard_sizes": [len(range(s, len(inputs), n)) for s in range(n)]}
    labeller = Predictor(teacher, max_atoms=max_atoms, max_structures=chunk)
    t0 = time.perf_counter()
    labelled_now = 0
    with ShardWriter(out, job, i, n) as writer:
        if writer.state is not None:  # the capacities of the last commit: pad and size as before the kill
            labeller.capacities = {shape: Capacity(*c) for shape, c in pickle.loads(writer.state).items()}
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
            writer.commit(k, labels, indices, pickle.dumps(labeller.capacities))
            labelled_now += len(indices)
            bar.update(len(indices))
        bar.close()
        complete = writer.finish()
    seconds = time.perf_counter() - t0
    return {"out": out, "shard": f"{i}/{n}", "teacher": teacher.name, "structures": sum(map(len, chunks)),
            "labelled": labelled_now, "resumed_from": skipped, "seconds": round(seconds, 3),
            "structures_per_second": round(labelled_now / seconds, 3) if labelled_now else None,
            "shapes": sorted([list(s) for s in labeller.shapes_seen]), "capacity_growths": labeller.grown,
            "dataset_complete": complete}


def merge(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """`distiller label --merge`: one dataset from the shard directories of one job."""
    dataset = merge_datasets(inputs, out)
    return {"out": os.fspath(out), "structures": len(dataset), "files": len(dataset.parts),
            "teacher": dataset.teacher}
