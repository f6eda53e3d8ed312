"""Labelling jobs: a teacher's energies, forces, stress and ensemble spread for a set of structures, as a dataset.

    distiller label --teacher fennol-pmc:ani1x --structures samples.extxyz --out data/ani [--shard 3/16] [--hvp 4]

The structures of shard i/n are those with index k = i (mod n) in the job's input (files and datasets, in the
order given). A shard labels its structures sorted by atom count (ties by index), `chunk` at a time, so that
each teacher call sees structures of similar size; every chunk is committed atomically as one part file of the
dataset (see distiller.data.dataset). A job killed at any point and restarted with the same command skips the
committed chunks: it loses at most the chunk in flight and duplicates nothing. n processes (a SLURM array)
can label one set into one directory, or into several that `distiller label --merge` gathers. A directory that
holds another job's shards (another teacher, teacher file, inputs, shard count...) is refused before any work.

Bad input structures (invalid, or with elements the teacher does not know) stop the job before it labels
anything, naming the first; with `--skip-bad` (`skip_bad=True`) the whole input is screened first, the bad
ones are left out (shards and counts are those of the good ones; source indices stay the input's) and listed
with their reasons in the dataset's rejected.json.

Any energy model labels through one `distiller.predict.Predictor`: JAX teachers (FeNNol) in padded batches of a
few bucketed shapes, capacities kept between chunks (saved with every commit, so a restarted job pads exactly
as the uninterrupted one would have and gives the same numbers), with the ensemble's energy spread; host-only
teachers (Orb, ASE calculators) through their own `label`.

With `--hvp K` (`hvp=K`, JAX teachers only: a host teacher has first derivatives only and is refused before any
work) every structure also gets K unit directions and the teacher's H·v along each (eV/Å², the online HVP loss
term's convention), for offline training with `loss.hvp_weight`. The directions of the structure with input index
k are `unit_directions` (the online term's) of it alone, direction j keyed by (`hvp_seed`, k, j): a function of
the seed and the index only, so a resumed or sharded job stores the same ones.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from distiller.batch import pad_structures
from distiller.capacity import Capacity
from distiller.data.dataset import REJECTED, Dataset, ShardWriter, is_dataset, merge_datasets, open_dataset
from distiller.derivatives import unit_directions
from distiller.files import sha256, write_json_atomic
from distiller.load import as_model
from distiller.model import EnergyModel
from distiller.predict import Predictor
from distiller.structure import Structure, StructureError, read_structures
from distiller.teachers.registry import teacher_files


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def hvp_count(value) -> int:
    """K of `--hvp K` (an int, or its text), checked: an integer >= 1."""
    count = 0
    if isinstance(value, (int, np.integer, str)) and not isinstance(value, bool):
        try:
            count = int(value)
        except ValueError:
            pass
    if count < 1:
        raise ValueError(f"--hvp must be an integer >= 1 (directions per structure), got {value!r}")
    return count


@functools.partial(jax.jit, static_argnames="count")
def _unit_directions(batch, key, count: int):
    return jax.vmap(lambda j: unit_directions(batch, jax.random.fold_in(key, j)))(jnp.arange(count))


def hvp_directions(structure: Structure, seed: int, index: int, count: int) -> np.ndarray:
    """(count, n, 3) float64 (of float32 values) the directions of `structure`, input index `index`, for `--hvp
    count`: the online term's `unit_directions` of the structure alone (padded as a batch of one, whose shape is a
    function of its atom count), direction j keyed by (seed, index, j), so that nothing else (chunk, shard, batch,
    K) changes it."""
    key = jax.random.fold_in(jax.random.key(seed), index)
    directions = _unit_directions(jax.tree.map(jnp.asarray, pad_structures([structure])), key, count)
    return np.asarray(directions, np.float64)[:, :structure.n_atoms]


# --------------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """The job's input structures, from structure files (read whole) and datasets (read chunk by chunk).

    Files are read without validating their structures, so that the bad ones can be set aside: the job checks
    them up front (`refuse_bad` or `screen`); a dataset's structures are validated as they come in (`get`)."""

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
                structures = read_structures(path, validate=False)
                self._parts.append(structures)
                sizes.append(np.array([s.n_atoms for s in structures], np.int64))
                self.sources.append({"file": os.path.basename(path), "kind": "file", "sha256": sha256(path),
                                     "structures": len(structures)})
        self.n_atoms = np.concatenate(sizes)
        self._offsets = np.cumsum([0] + [len(s) for s in sizes])

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    def get(self, indices: Sequence[int], validate: bool = True) -> list[Structure]:
        """The structures at input positions `indices`; a dataset's validated unless not `validate`."""
        indices = np.asarray(indices, np.int64)
        which = np.searchsorted(self._offsets, indices, side="right") - 1
        out: list[Structure | None] = [None] * len(indices)
        for p in np.unique(which):
            where = np.flatnonzero(which == p)
            local = (indices[where] - self._offsets[p]).tolist()
            part = self._parts[p]
            if isinstance(part, Dataset):
                got = [x.validated() for x in part.get(local)] if validate else part.get(local)
            else:
                got = [part[k] for k in local]
            for j, k, s in zip(where, local, got):
                info = {key: v for key, v in s.info.items() if key != "energy_spread"}  # a previous teacher's
                info.setdefault("source", {"path": self.paths[p], "index": k})
                out[j] = s.replace(info=info, directions=None, hvp=None)
        return out  # type: ignore[return-value]

    @property
    def has_datasets(self) -> bool:
        return any(isinstance(p, Dataset) for p in self._parts)

    def from_files(self) -> list[Structure]:
        """The structures of the structure files among the inputs (in memory: checked up front), unvalidated."""
        return [s for p in self._parts if not isinstance(p, Dataset) for s in p]


def screen(inputs: Inputs, teacher: EnergyModel, block: int = 1024) -> list[dict]:
    """The input structures that `teacher` cannot label (invalid, or with an element it does not know): input
    index, name, source and the reason, as rejected.json lists them."""
    rejected = []
    for start in range(0, len(inputs), block):
        indices = range(start, min(start + block, len(inputs)))
        for k, s in zip(indices, inputs.get(indices, validate=False)):
            try:
                teacher.check([s.validated()])
            except StructureError as err:
                rejected.append({"index": k, "name": s.name, "source": s.info["source"], "reason": str(err)})
    return rejected


def refuse_bad(teacher: EnergyModel, structures: Sequence[Structure]) -> None:
    """StructureError naming the first structure that is invalid or that `teacher` cannot label."""
    try:
        teacher.check([s.validated() for s in structures])
    except StructureError as err:
        raise StructureError(f"{err} (with --skip-bad, or skip_bad=True, the others are labelled and the bad ones "
                             f"listed in {REJECTED})") from None


def shard_chunks(n_atoms: np.ndarray, shard: int, shards: int, chunk: int,
                 keep: np.ndarray | None = None) -> list[list[int]]:
    """The chunks of shard i/n: its indices (k = i mod n; only those where `keep`, if given) sorted by (atom
    count, index), `chunk` at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    members = np.arange(shard, len(n_atoms), shards)
    if keep is not None:
        members = members[keep[members]]
    members = members[np.lexsort((members, n_atoms[members]))]
    return [members[k:k + chunk].tolist() for k in range(0, len(members), chunk)]


# --------------------------------------------------------------------------------------------------
# The job


def label_dataset(teacher: EnergyModel | str, structures: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  shard: tuple[int, int] = (0, 1), chunk: int = 64, max_atoms: int = 4096,
                  skip_bad: bool = False, hvp: int | None = None, hvp_seed: int = 0, progress: bool = True) -> dict:
    """Label shard `shard` = (i, n) of the structures in `structures` (files and datasets) into dataset `out`.

    `teacher` is an EnergyModel or a teacher spec ("fennol-pmc:ani1x"). Resumes a killed job. A bad structure
    stops the job before any work (a dataset's, before its chunk), unless `skip_bad`: then the bad ones are
    left out and listed in `out`/rejected.json. `hvp` = K: also K directions per structure (from `hvp_seed` and
    its input index) and the teacher's H·v along each (a JAX teacher only; see the module docstring).
    Returns a summary: structures of the shard, how many were labelled now, time, rate, batch shapes, how many
    were rejected, and whether the dataset is complete (the last shard to finish writes its metadata.json).
    """
    i, n = shard
    out = os.fspath(out)
    hvp = None if hvp is None else hvp_count(hvp)
    teacher = as_model(teacher)
    # First: it refuses a host teacher with --hvp before anything is read or written.
    labeller = Predictor(teacher, max_atoms=max_atoms, max_structures=chunk, hvp=hvp is not None)
    inputs = Inputs(structures)
    if skip_bad:
        rejected = screen(inputs, teacher)
    else:  # the files' structures are in memory: fail before labelling anything, naming the bad one
        rejected = []
        refuse_bad(teacher, inputs.from_files())
    keep = np.ones(len(inputs), bool)
    keep[[r["index"] for r in rejected]] = False
    chunks = shard_chunks(inputs.n_atoms, i, n, chunk, keep)
    # The sha256 of the teacher's files: a dataset is never resumed or extended with other weights.
    job = {"teacher": teacher.name, "teacher_files": teacher_files(teacher.name),
           "teacher_class": type(teacher.source).__name__, "sources": inputs.sources,
           "structures": int(keep.sum()), "rejected": len(rejected), "chunk": chunk, "shards": n,
           "shard_sizes": [int(keep[s::n].sum()) for s in range(n)]}
    if hvp is not None:  # only then: a job without keeps the identity of those labelled before --hvp existed
        job["hvp"] = {"directions": hvp, "seed": int(hvp_seed)}
    t0 = time.perf_counter()
    labelled_now = 0
    with ShardWriter(out, job, i, n) as writer:
        if skip_bad:  # the same list from every shard (the whole input was screened)
            write_json_atomic(os.path.join(out, REJECTED), {"inputs": len(inputs), "rejected": rejected})
        if writer.state is not None:  # the capacities of the last commit: pad and size as before the kill
            labeller.capacities = {shape: Capacity(*c) for shape, c in pickle.loads(writer.state).items()}
        done = writer.committed_chunks
        skipped = sum(len(c) for k, c in enumerate(chunks) if k in done)
        bar = tqdm(total=sum(map(len, chunks)), initial=skipped, disable=not progress, unit="structure",
                   desc=f"label {i}/{n}" + (f" (H·v x{hvp})" if hvp else ""), dynamic_ncols=True)
        for k, indices in enumerate(chunks):
            if k in done:
                continue
            structures = inputs.get(indices)
            if inputs.has_datasets and not skip_bad:  # a dataset's structures: checked chunk by chunk
                refuse_bad(teacher, structures)
            if hvp is not None:
                structures = [s.replace(directions=hvp_directions(s, hvp_seed, index, hvp))
                              for s, index in zip(structures, indices)]
            labels = labeller(structures)
            writer.commit(k, labels, indices, pickle.dumps(labeller.capacities))
            labelled_now += len(indices)
            bar.update(len(indices))
        bar.close()
        complete = writer.finish()
    seconds = time.perf_counter() - t0
    return {"out": out, "shard": f"{i}/{n}", "teacher": teacher.name, "structures": sum(map(len, chunks)),
            "labelled": labelled_now, "resumed_from": skipped, "rejected": len(rejected), "hvp_directions": hvp or 0,
            "seconds": round(seconds, 3),
            "structures_per_second": round(labelled_now / seconds, 3) if labelled_now else None,
            "shapes": sorted([list(s) for s in labeller.shapes_seen]), "capacity_growths": labeller.grown,
            "dataset_complete": complete}


def merge(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """`distiller label --merge`: one dataset from the shard directories of one job."""
    dataset = merge_datasets(inputs, out)
    return {"out": os.fspath(out), "structures": len(dataset), "files": len(dataset.parts),
            "teacher": dataset.teacher, "hvp_directions": dataset.hvp_directions}
