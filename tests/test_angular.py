"""The angular embedding's algebra (distiller.students.angular): its invariants are the angle powers they claim to
be, and they are rotation invariant; bad sizes are refused when the config is made. (The model as a whole is in
the contract suite: tests/test_contract.py's ANGULAR student.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distiller.students import PaiNNConfig
from distiller.students.angular import all_degrees, angular_invariants, monomial_exponents, monomials


@pytest.mark.parametrize("degree", [0, 1, 4, 7])
def test_monomials_of_one_degree_multiply_to_the_cosine_power(degree):
    rng = np.random.default_rng(degree)
    u = rng.normal(size=(6, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    with jax.enable_x64(True):
        m = np.asarray(monomials(jnp.asarray(u), degree))
    exponents = monomial_exponents(degree)
    assert len({tuple(e) for e in exponents}) == len(exponents) == (degree + 1) * (degree + 2) * (degree + 3) // 6
    for n in range(degree + 1):
        block = m[:, exponents.sum(axis=1) == n]
        np.testing.assert_allclose(block @ block.T, (u @ u.T) ** n, atol=1e-12)


def test_invariants_are_weighted_sums_of_cosine_powers_and_rotation_invariant():
    """B[n, c, c'] = Σ_jk w_c(j) w_c'(k) cos^n θ_jk for one atom's neighbours, and the same after a rotation."""
    rng = np.random.default_rng(0)
    degree, channels = 5, 3
    units = rng.normal(size=(7, 3))
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    weights = rng.normal(size=(7, channels))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    with jax.enable_x64(True):
        def invariants(u):
            densities = jnp.einsum("ec,em->cm", weights, monomials(jnp.asarray(u), degree))[None]
            return np.asarray(angular_invariants(densities, degree))[0]

        b, rotated = invariants(units), invariants(units @ q.T)
    upper = np.triu_indices(channels)
    expected = np.concatenate([np.einsum("jc,jk,kd->cd", weights, (units @ units.T) ** n, weights)[upper]
                               for n in range(degree + 1)])
    np.testing.assert_allclose(b, expected, atol=1e-10)
    np.testing.assert_allclose(rotated, b, atol=1e-10)


@pytest.mark.parametrize("fields", [{"angular_degree": -1}, {"angular_degree": 4, "angular_channels": 0},
                                    {"angular_degree": 4, "angular_cutoff": 6.0},
                                    {"angular_degree": 4, "angular_cutoff": 0.0}])
def test_bad_angular_sizes_are_refused(fields):
    with pytest.raises(ValueError, match="angular"):
        PaiNNConfig(cutoff=5.0, **fields)


def test_without_the_embedding_its_sizes_are_not_checked():
    assert PaiNNConfig(cutoff=3.0).angular_cutoff == 3.5  # a 3 Å PaiNN with the default (unused) angular cutoff


@pytest.mark.parametrize("degree", [0, 1, 2, 5, 6])
def test_lower_degrees_from_the_two_highest_are_exact_on_the_sphere(degree):
    """The embedding sums only degrees degree − 1 and degree over edges; the rest follow per atom."""
    rng = np.random.default_rng(degree)
    u = rng.normal(size=(9, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.normal(size=(9, 2))
    with jax.enable_x64(True):
        full = jnp.einsum("ec,em->cm", w, monomials(jnp.asarray(u), degree))
        top = jnp.einsum("ec,em->cm", w, monomials(jnp.asarray(u), degree, max(degree - 1, 0)))
        assert top.shape[1] == (degree + 1) ** 2
        np.testing.assert_allclose(np.asarray(all_degrees(top, degree)), np.asarray(full), atol=1e-12)
