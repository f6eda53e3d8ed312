"""The jittable neighbour list against ASE's, on random triclinic cells, molecules and batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list

from distiller import neighbours as nl
from distiller.batch import pad_structures, with_neighbours
from distiller.capacity import make_batch
from distiller.structure import Structure, read_structures


def edge_set(batch):
    m = np.asarray(batch.edge_mask)
    r, s = np.asarray(batch.receivers)[m], np.asarray(batch.senders)[m]
    sh = np.asarray(batch.shifts)[m].round().astype(int)
    return {(a, b, *c) for a, b, c in zip(r, s, sh)}, int(m.sum())


def ase_set(structures, cutoff):
    out, start = set(), 0
    for st in structures:
        i, j, S = neighbor_list("ijS", st.to_ase(), cutoff)
        out |= {(a + start, b + start, *c) for a, b, c in zip(i, j, S)}
        start += st.n_atoms
    return out


def random_crystal(rng, n, scale, name, pbc=None):
    cell = rng.normal(size=(3, 3)) * scale * 0.3 + np.eye(3) * scale
    pbc = rng.random(3) < 0.7 if pbc is None else np.asarray(pbc)
    # Keep atoms apart so the structure is valid (no pair under 0.1 Å).
    pos = rng.random((n, 3)) @ cell
    return Structure(np.full(n, 6), pos, cell, pbc, name=name)


@pytest.mark.parametrize("trial", range(6))
def test_matches_ase_on_random_batches(trial):
    rng = np.random.default_rng(trial)
    cutoff = float(rng.uniform(2.5, 5.0))
    structures = [random_crystal(rng, int(rng.integers(1, 25)), float(rng.uniform(1.5, 8.0)), f"crystal {k}")
                  for k in range(3)]
    structures.append(Structure(np.full(6, 1), rng.normal(size=(6, 3)) * 3, np.zeros((3, 3)), np.zeros(3, bool), name="mol"))
    batch, _ = make_batch(structures, cutoff)
    ours, count = edge_set(batch)
    assert count == len(ours), "an edge appears twice"
    assert ours == ase_set(structures, cutoff)
    # The layout the student's Pallas kernel relies on (pallas_kernels.edges.graph): real edges sorted by
    # receiver and before every padding edge, and the list closed under reversal (i <- j with shift S has
    # j <- i with shift -S).
    mask = np.asarray(batch.edge_mask)
    receivers = np.asarray(batch.receivers)[mask]
    assert np.all(np.diff(receivers) >= 0), "edges must be sorted by receiver"
    assert not np.any(mask[mask.sum():]), "padding edges must come after every real edge"
    assert ours == {(j, i, *(-np.asarray(c)).tolist()) for i, j, *c in ours}, "list not closed under reversal"


def test_cell_much_smaller_than_cutoff_gives_every_image():
    # One atom in a 1.7 Å cubic cell with a 5 Å cutoff: each neighbour is an image of the atom itself.
    s = Structure(np.array([6]), np.zeros((1, 3)), np.eye(3) * 1.7, np.ones(3, bool), name="tiny")
    batch, capacity = make_batch([s], 5.0)
    ours, count = edge_set(batch)
    assert ours == ase_set([s], 5.0) and count == len(ours) > 80
    assert capacity.reach >= 3


def test_water_box(structures_dir):
    water = read_structures(structures_dir / "watertiny.extxyz")
    batch, _ = make_batch(water, 5.2)
    assert edge_set(batch)[0] == ase_set(water, 5.2)


def test_edge_vectors_are_the_minimum_image_distances(structures_dir):
    water = read_structures(structures_dir / "watertiny.extxyz")
    batch, _ = make_batch(water, 4.0)
    m = np.asarray(batch.edge_mask)
    d = np.linalg.norm(np.asarray(batch.edge_vectors())[m], axis=1)
    i, j, d_ase = neighbor_list("ijd", water[0].to_ase(), 4.0)
    assert np.allclose(np.sort(d), np.sort(d_ase), atol=1e-4)


def test_overflow_flag_and_reallocation_inside_jit():
    rng = np.random.default_rng(7)
    s = random_crystal(rng, 30, 6.0, "c", pbc=[True, True, True])
    batch = jax.tree_util.tree_map(jnp.asarray, pad_structures([s]))
    small = nl.NeighbourCapacity(edges=8, bins=1, bin_size=2, reach=1)
    rebuild = jax.jit(with_neighbours, static_argnums=(1, 2))
    out, neighbours = rebuild(batch, 4.0, small)
    assert bool(neighbours.overflow)
    # Edges lost to a full bin are not counted, so growing may take more than one round.
    capacity, rounds = small, 0
    while bool(neighbours.overflow):
        capacity, rounds = nl.grow(capacity, neighbours.needed), rounds + 1
        out, neighbours = rebuild(batch, 4.0, capacity)
    assert rounds <= 3
    assert edge_set(out)[0] == ase_set([s], 4.0)
    # Squeezing the atoms together overflows the same capacity again, and says so.
    squeezed = batch._replace(positions=batch.positions * 0.5, cell=batch.cell * 0.5)
    _, neighbours = rebuild(squeezed, 4.0, capacity)
    assert bool(neighbours.overflow)


def test_round_up_buckets():
    sizes = {nl.round_up(n) for n in range(1, 5000)}
    assert len(sizes) < 30
    assert all(nl.round_up(n) >= n for n in range(1, 5000))
    assert all(nl.round_up(n) <= 1.5 * n + 2 for n in range(1, 5000))
