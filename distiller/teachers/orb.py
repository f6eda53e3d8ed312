"""Orb force fields (orb-models, PyTorch) as a distiller teacher, through the torch bridge
(distiller.teachers.torch_bridge: checks, chunking, labels, DLPack, torch's global settings, the EnergyModel).

    load_orb("orb:orb-v3-conservative-inf-omat")             orb's pretrained model (orb's own loader and cache)
    load_orb("orb:orb-v3-direct-20-omat", weights_path=...)  a local checkpoint in that architecture
    load_orb("orb:random/orb-v3-conservative?seed=1")        the real architecture, seeded random weights

Offline labelling (`OrbTeacher.label`) turns many structures into orb's own atom graphs, concatenates them and
runs one `predict` per batch (`OrbTeacher.predict_chunk`, the one method the bridge asks of a teacher); energy
(eV), forces (eV/Å) and, for periodic cells, stress (eV/Å³, ASE's sign: (1/V) dE/dε) come back. Conservative
models give gradient forces and stress (orb's keys "grad_forces" / "grad_stress"), direct models their heads'
"forces" / "stress". Stress is returned as a (3, 3) matrix.

Orb sets process-wide torch state when it loads a model (default dtype, float32 matmul precision, i.e. TF32).
Every entry point here runs inside the bridge's `torch_settings`, which sets what this teacher needs and
restores the caller's default dtype, TF32 flags and matmul precision afterwards.

orb-models versions. 0.5.x (Python 3.11) and 0.6.x / 0.7.x (Python >= 3.12) differ in how models are built and
loaded, how graphs are built and batched and where the calculator lives; every such call goes through
`orb_api()` (`Orb05` or `Orb06`, chosen once). docs/design.md lists the differences.

Neighbours. Orb builds k-nearest-neighbour graphs within its cutoff, capped at `max_num_neighbors` per atom.
For the "-20-" models and orb-v2 (cap 20) the cap *is* the model (it was trained on truncated graphs), so it is
kept ("truncate"). For the others the cap (120) stands for "every neighbour"; an atom with more neighbours
within the cutoff than the cap would silently lose the farthest ones, so the cap is raised for that structure
("grow", the default for them) or the structure is refused with a StructureError ("error"). Neighbours are
counted on orb's own graph (`OrbTeacher.graph`).

In-jit use (`orb_model(...).energies`, distiller.teachers.host) wraps the bridge in `jax.pure_callback`: every
call of the jitted function leaves the device for the host, rebuilds the structures from the padded Batch,
builds orb's graphs, runs one torch `predict` and copies the results back. That is a host round trip and a full teacher evaluation per step, on
top of the student's own work: for Orb (25M parameters) usually far more expensive than the student step
itself, and no cheaper than offline labelling of the same structures (on a 2-core CPU it took ~1.1x the time
of `label` for four aspirins; on a GPU the Batch also crosses device -> host and the labels back); label
offline when the structures are known in advance. Its derivative is orb's own forces and stress (first
derivatives only), and a jitted step waits for the host on every call.

GPU: with torch and JAX on the same GPU, the bridge's `to_jax` / `from_jax` hand arrays over through DLPack
without a host copy (`label_arrays` returns JAX arrays made this way); on a CPU they go through numpy. Loading
applies distiller.gpu_memory's policy first, so that JAX does not preallocate the GPU memory orb needs.

Precision: "float32-highest" by default (full float32 matmuls). orb's own default, "float32-high", lets GPUs use
TF32: about twice as fast, but on an H200 it moved random-weight orb-v3 forces by ~1e-3 eV/Å and an 81-atom
water box's energy by ~0.05 eV against the CPU, noise a student would learn. "float64" for finite differences.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import warnings
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from distiller.gpu_memory import make_room_for_torch
from distiller.model import EnergyModel
from distiller.structure import Structure, StructureError
from distiller.teachers.torch_bridge import (PRECISIONS, TorchTeacher, default_device, energy_model, split_spec,
                                             torch_settings, voigt_to_matrices)

NEIGHBOUR_POLICIES = ("truncate", "grow", "error")
# orb's atom embedding is a one-hot of Z over 118 classes (indices 0..117), so Z = 118 does not fit.
ORB_ELEMENTS = frozenset(range(1, 118))


# --------------------------------------------------------------------------------------------------
# orb-models versions: every call whose form depends on the version goes through `orb_api()`.
# Both classes have the same methods, taking and returning the same things; `config` is orb's graph settings
# (radius, max_num_neighbors): a SystemConfig in 0.5, a ForcefieldAtomsAdapter from 0.6 on.


@contextlib.contextmanager
def orb_library_warnings_silenced() -> Iterator[None]:
    """orb-models 0.5 passes a torch tensor to ASE's cell_to_cellpar (numpy 2 then warns, once per structure, that
    torch's __array__ takes no copy keyword) and decorates a function with torch.jit.script (deprecated by torch):
    neither is a problem of the labels nor ours to fix, and hundreds of them bury the warnings that matter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        yield


class Orb05:
    """orb-models 0.5.x: a model carries its SystemConfig; `atomic_system` builds graphs (scipy kd-tree on the
    host); AtomGraphs is a NamedTuple, batched by `base.batch_graphs`."""

    @staticmethod
    def random_model(function: str, kwargs: dict, radius: float, cap: int):
        """(model, config): orb's architecture function with weights from torch's global RNG."""
        from orb_models.forcefield import pretrained
        from orb_models.forcefield.atomic_system import SystemConfig

        model = getattr(pretrained, function)(device="cpu", system_config=SystemConfig(radius, cap), **kwargs)
        return model, model.system_config

    @staticmethod
    def pretrained_model(loader: Callable, **kwargs):
        """(model, config) from one of orb's pretrained loaders."""
        model = loader(**kwargs)
        return model, model.system_config

    @staticmethod
    def atom_graph(atoms: Atoms, config, cap: int, dtype: torch.dtype):
        """orb's AtomGraphs of one structure, built on the host with at most `cap` neighbours per atom."""
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs

        with orb_library_warnings_silenced():
            return ase_atoms_to_atom_graphs(atoms, config, max_num_neighbors=cap, device=torch.device("cpu"),
                                            output_dtype=dtype, graph_construction_dtype=dtype)

    @staticmethod
    def with_cap(graph, cap: int):
        """The graph, recording `cap` as its max_num_neighbors."""
        return graph._replace(max_num_neighbors=torch.tensor([cap]))

    @staticmethod
    def batch(graphs: list, config):
        from orb_models.forcefield.base import batch_graphs

        return batch_graphs(graphs)

    @staticmethod
    def calculator(model, config, **kwargs):
        from orb_models.forcefield.calculator import ORBCalculator

        return ORBCalculator(model, system_config=config, **kwargs)

    @staticmethod
    def charge_spin_conditioner() -> type:
        from orb_models.forcefield.nn_util import ChargeSpinConditioner

        return ChargeSpinConditioner


class Orb06:
    """orb-models 0.6.x and 0.7.x: a ForcefieldAtomsAdapter builds (and batches) graphs and comes back from the
    pretrained loaders next to the model; architecture functions take no system config; AtomGraphs is a plain
    class; ORBCalculator lives in `inference.calculator` and needs the adapter."""

    # orb's default and recommended graph builder (nvalchemi-toolkit-ops, warp kernels), named here so that a
    # change of orb's default cannot change the graphs. It runs on the CPU too (warp compiles its CPU kernels
    # once and caches them); "knn_scipy", 0.5's CPU builder, is deprecated (a warning on every call).
    EDGE_METHOD = "knn_alchemi"

    @staticmethod
    def random_model(function: str, kwargs: dict, radius: float, cap: int):
        from orb_models.forcefield import pretrained
        from orb_models.forcefield.forcefield_adapter import ForcefieldAtomsAdapter

        model = getattr(pretrained, function)(device="cpu", **kwargs)
        if function == "orb_v3_conservative_architecture":
            # 0.7 made the ZBL pair energy a per-graph sum for new models; its loaders of the published orb-v3
            # conservative models set back the mean they were trained with (0.5 and 0.6 only have the mean).
            # The random architecture is the published one.
            model.pair_repulsion_fn.node_aggregation = "mean"
        return model, ForcefieldAtomsAdapter(radius=radius, max_num_neighbors=cap)

    @staticmethod
    def pretrained_model(loader: Callable, **kwargs):
        return loader(**kwargs)  # already (model, adapter)

    @classmethod
    def atom_graph(cls, atoms: Atoms, config, cap: int, dtype: torch.dtype):
        return config.from_ase_atoms(atoms, max_num_neighbors=cap, edge_method=cls.EDGE_METHOD,
                                     device=torch.device("cpu"), output_dtype=dtype, graph_construction_dtype=dtype)

    @staticmethod
    def with_cap(graph, cap: int):
        graph = copy.copy(graph)  # AtomGraphs is mutable now: leave the given one alone
        graph.max_num_neighbors = torch.tensor([cap])
        return graph

    @staticmethod
    def batch(graphs: list, config):
        return config.batch(graphs)

    @staticmethod
    def calculator(model, config, **kwargs):
        from orb_models.forcefield.inference.calculator import ORBCalculator

        return ORBCalculator(model, config, **kwargs)

    @staticmethod
    def charge_spin_conditioner() -> type:
        from orb_models.common.models.nn_util import ChargeSpinConditioner

        return ChargeSpinConditioner


@functools.cache
def orb_api() -> type:
    """Orb05 or Orb06 for the installed orb-models, by feature: 0.6 added `forcefield.forcefield_adapter`."""
    with orb_library_warnings_silenced():
        importlib.import_module("orb_models.forcefield.pretrained")  # the import that calls torch.jit.script
    return Orb06 if importlib.util.find_spec("orb_models.forcefield.forcefield_adapter") else Orb05


# --------------------------------------------------------------------------------------------------
# Specs


@dataclasses.dataclass(frozen=True)
class OrbSpec:
    """A parsed `orb:` spec: `orb:NAME` (pretrained) or `orb:random/ARCH`, with `?key=value&...` options
    seed (random only), precision (float32-high | float32-highest | float64) and neighbours (truncate | grow |
    error)."""

    name: str
    random: bool
    seed: int = 0
    precision: str = "float32-highest"  # not orb's "float32-high": TF32 noise does not belong in labels
    neighbours: str | None = None  # None: the model's own policy (module docstring)


# Random-weight architectures: orb's architecture function, its extra arguments and the system config
# (radius, max_num_neighbors) of the pretrained models of that architecture.
RANDOM_ARCHITECTURES: dict[str, tuple[str, dict, tuple[float, int]]] = {
    "orb-v3-conservative": ("orb_v3_conservative_architecture", {}, (6.0, 120)),
    "orb-v3-direct": ("orb_v3_direct_architecture", {}, (6.0, 120)),
    "orb-v3-conservative-omol": ("orb_v3_conservative_architecture",
                                 {"has_charge_spin_cond": True, "has_stress": False}, (6.0, 120)),
    "orb-v3-direct-omol": ("orb_v3_direct_architecture",
                           {"has_charge_spin_cond": True, "has_stress": False}, (6.0, 120)),
    "orb-v2": ("orb_v2_architecture", {}, (6.0, 20)),
}


def pretrained_models() -> dict[str, Callable]:
    """orb's pretrained loaders by name, without the deprecated (v1) ones, which only raise. Told apart by the
    loader's name: 0.7's "orbmol-v1-*" are aliases of the orb-v3 OMol loaders and do load."""
    from orb_models.forcefield.pretrained import ORB_PRETRAINED_MODELS

    return {name: fn for name, fn in ORB_PRETRAINED_MODELS.items() if "v1" not in fn.__name__}


def valid_specs() -> list[str]:
    return [f"orb:{name}" for name in pretrained_models()] + [f"orb:random/{name}" for name in RANDOM_ARCHITECTURES]


def parse_spec(spec: str) -> OrbSpec:
    """`orb:NAME[?options]` or `orb:random/ARCH[?options]` -> OrbSpec; anything else is a ValueError that lists
    the valid specs."""

    def bad(why: str) -> ValueError:
        return ValueError(f"bad Orb teacher spec {spec!r}: {why}. Valid specs: {', '.join(valid_specs())}; "
                          f"options ?seed=N (random only), precision={'|'.join(PRECISIONS)}, "
                          f"neighbours={'|'.join(NEIGHBOUR_POLICIES)}")

    body, options = split_spec(spec, "orb", ("seed", "precision", "neighbours"), bad)
    random = body.startswith("random/")
    name = body.removeprefix("random/")
    if name not in (RANDOM_ARCHITECTURES if random else pretrained_models()):
        raise bad(f"unknown {'architecture' if random else 'model'} {name!r}")
    if "seed" in options and not random:
        raise bad("seed applies to random/ architectures only")
    if "seed" in options and not options["seed"].isdigit():
        raise bad(f"seed must be a non-negative integer, got {options['seed']!r}")
    if options.get("precision", OrbSpec.precision) not in PRECISIONS:
        raise bad(f"unknown precision {options['precision']!r}")
    if options.get("neighbours", "grow") not in NEIGHBOUR_POLICIES:
        raise bad(f"unknown neighbour policy {options['neighbours']!r}")
    return OrbSpec(name=name, random=random, seed=int(options.get("seed", 0)),
                   precision=options.get("precision", OrbSpec.precision), neighbours=options.get("neighbours"))


def _default_policy(cap: int) -> str:
    """kNN-20 models (cap 20: the "-20-" ones and the orb-v2 family) are defined by their truncated graphs; the
    others' cap (120) stands for every neighbour. By the cap, not the name: 0.7's "orbmol-v2" has cap 120."""
    return "truncate" if cap <= 20 else "grow"


# --------------------------------------------------------------------------------------------------
# Loading


def _random_model(name: str, seed: int):
    """(model, config) of a random/ architecture."""
    function, kwargs, (radius, cap) = RANDOM_ARCHITECTURES[name]
    # fork_rng: seeding must not move the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]), torch_settings(torch.float32):
        torch.manual_seed(seed)
        return orb_api().random_model(function, kwargs, radius, cap)


def _pretrained_model(spec: str, name: str, weights_path: str | None, device: str, precision: str):
    """(model, config) from orb's loader of `name`."""
    loader = pretrained_models()[name]
    kwargs = {} if weights_path is None else {"weights_path": str(weights_path)}
    try:
        with warnings.catch_warnings():  # orb warns that it sets the global dtype; torch_settings undoes it
            warnings.simplefilter("ignore")
            return orb_api().pretrained_model(loader, device=device, precision=precision, compile=False, **kwargs)
    except Exception as err:  # cached_path, torch.load, load_state_dict...: all mean "no usable weights"
        where = weights_path or "orb's download (cached under ~/.cache/cached_path)"
        raise RuntimeError(f"{spec}: cannot load the weights of {name} from {where}: {type(err).__name__}: {err}. "
                           f"Pass weights_path= a local orb checkpoint (.ckpt) for this architecture.") from err


def load_orb(spec: str, weights_path: str | None = None, device: str | None = None,
             seed: int | None = None) -> "OrbTeacher":
    """The Orb teacher named by `spec` (see `parse_spec`); `seed` overrides the spec's for random/ weights."""
    make_room_for_torch()  # JAX's GPU memory policy, before anything here can initialise JAX's backend
    parsed = parse_spec(spec)
    if seed is not None:
        if not parsed.random:
            raise ValueError(f"{spec}: seed applies to orb:random/ architectures only")
        parsed = dataclasses.replace(parsed, seed=int(seed))
    if parsed.random and weights_path is not None:
        raise ValueError(f"{spec}: random/ architectures take no weights_path (use orb:NAME with weights_path)")
    device = default_device(device)
    dtype = PRECISIONS[parsed.precision]
    with torch_settings():  # orb's loader sets global torch state: undo it
        if parsed.random:
            model, config = _random_model(parsed.name, parsed.seed)
        else:
            model, config = _pretrained_model(spec, parsed.name, weights_path, device, parsed.precision)
        model = model.to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    conservative = hasattr(model, "grad_forces_name")  # what ORBCalculator tests too
    conditioner = getattr(model.model, "conditioner", None)
    cap = int(config.max_num_neighbors)
    return OrbTeacher(
        spec=spec,
        cutoff=float(config.radius),
        elements=ORB_ELEMENTS,
        max_neighbours=cap,
        neighbours=parsed.neighbours or _default_policy(cap),
        conservative=conservative,
        has_stress=bool(model.has_stress),
        charge_spin=isinstance(conditioner, orb_api().charge_spin_conditioner()),
        precision=parsed.precision,
        device=device,
        model=model,
        config=config,
    )


def orb_calculator(teacher: "OrbTeacher", **kwargs):
    """orb's own ASE calculator (ORBCalculator) on the teacher's model and graph settings, for cross-checks;
    kwargs (device, max_num_neighbors, ...) go to it."""
    return orb_api().calculator(teacher.model, teacher.config, **kwargs)


# --------------------------------------------------------------------------------------------------
# The teacher


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrbTeacher(TorchTeacher):
    """An Orb model behind distiller's Teacher protocol (the torch bridge's `TorchTeacher`). Host-only."""

    max_neighbours: int  # orb's max_num_neighbors of this model
    neighbours: str  # "truncate" | "grow" | "error": what happens above max_neighbours (module docstring)
    conservative: bool  # forces and stress are gradients of the energy
    has_stress: bool  # False for models without stress (the OMol ones): periodic structures get no stress
    charge_spin: bool  # the model is conditioned on info["charge"] and info["spin"]
    config: Any = dataclasses.field(default=None, compare=False, repr=False)  # orb's graph settings (orb_api)

    library: ClassVar[str] = "orb"
    partial_pbc: ClassVar[bool] = False

    # ---- checks ---------------------------------------------------------------------------------

    def check_structure(self, s: Structure) -> None:
        """Charge-conditioned models need numeric info["charge"] and info["spin"]."""
        if self.charge_spin and not all(isinstance(s.info.get(k), (int, float, np.number)) for k in ("charge", "spin")):
            raise StructureError(f"structure '{s.name}': teacher {self.spec} needs numeric info['charge'] and "
                                 f"info['spin'], got {s.info.get('charge')!r} and {s.info.get('spin')!r}")

    # ---- orb's graphs ---------------------------------------------------------------------------

    def _atoms(self, s: Structure) -> Atoms:
        # orb treats a graph as non-periodic (no net torque on direct forces, no stress) iff its cell is zero.
        cell = s.cell if s.periodic else np.zeros((3, 3))
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=cell, pbc=s.pbc)
        if self.charge_spin:
            atoms.info.update(charge=float(s.info["charge"]), spin=float(s.info["spin"]))
        return atoms

    def _orb_graph(self, s: Structure, cap: int):
        # Built on the host and batched there, as orb's own data pipeline does.
        with torch_settings(self.dtype):
            return orb_api().atom_graph(self._atoms(s), self.config, cap, self.dtype)

    def graph(self, s: Structure):
        """orb's AtomGraphs of one (checked) structure under the teacher's neighbour policy.

        Neighbours are counted with orb's own graph: built with a cap one above the model's, an atom that
        reaches it has more neighbours within the cutoff than the model's cap; the cap then doubles until no
        atom reaches it, so the graph holds every neighbour. Below the cap the graph is exactly orb's.
        """
        cap = self.max_neighbours
        if self.neighbours == "truncate":
            return self._orb_graph(s, cap)
        probe = cap + 1
        while True:
            graph = self._orb_graph(s, probe)
            counts = torch.bincount(graph.senders, minlength=s.n_atoms)  # orb's senders are the centres
            most = int(counts.max()) if counts.numel() else 0
            if most < probe:
                break
            probe *= 2
        if most > cap and self.neighbours == "error":
            atom = int(torch.argmax(counts))
            raise StructureError(
                f"structure '{s.name}': atom {atom} has {most} neighbours within {self.cutoff} Å, more than "
                f"teacher {self.spec}'s cap of {cap} (orb's max_num_neighbors), so orb would drop the farthest; "
                f"use the neighbours=grow policy to raise the cap")
        return orb_api().with_cap(graph, max(cap, most))

    def graphs(self, structures: Sequence[Structure]):
        """orb's batched AtomGraphs of (checked) structures, on the teacher's device."""
        return orb_api().batch([self.graph(s) for s in structures], self.config).to(self.device)

    def predict_graphs(self, graphs) -> dict[str, torch.Tensor]:
        """orb's own `predict` on batched graphs (from `graphs`) at the teacher's precision: its raw output
        dict (orb's keys, Voigt stress; energy in float64 from orb 0.7 on)."""
        with torch_settings(self.dtype, self.matmul_precision), torch.set_grad_enabled(self.conservative):
            return self.model.predict(graphs)

    def _keys(self) -> tuple[str, str, str | None]:
        if self.conservative:
            m = self.model
            return m.energy_name, m.grad_forces_name, (m.grad_stress_name if m.has_stress else None)
        return "energy", "forces", ("stress" if self.has_stress else None)

    def predict_chunk(self, chunk: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(energy (G,), forces (A, 3), stress (G, 3, 3)) of checked structures, one orb `predict` on their
        batched graphs, as tensors on the teacher's device (the bridge checks shapes and zeroes non-periodic
        stress)."""
        energy_key, forces_key, stress_key = self._keys()
        out = self.predict_graphs(self.graphs(chunk))
        energy, forces = out[energy_key].reshape(-1), out[forces_key]
        if stress_key is None:
            return energy, forces, torch.zeros((len(chunk), 3, 3), dtype=forces.dtype, device=forces.device)
        return energy, forces, voigt_to_matrices(out[stress_key].reshape(len(chunk), 6))  # orb's Voigt order is ASE's


def orb_model(spec: str, weights_path: str | None = None, device: str | None = None,
              seed: int | None = None) -> EnergyModel:
    """The Orb teacher named by `spec` as an EnergyModel (host-only: `label`, and its pure_callback form)."""
    return energy_model(load_orb(spec, weights_path=weights_path, device=device, seed=seed))
