"""The torch -> numpy / JAX bridge that every PyTorch teacher (Orb, SevenNet, ...) shares.

A torch MLIP becomes a distiller teacher by one small class: a frozen dataclass subclassing `TorchTeacher` that
holds its model, the elements it knows and its cutoff, made by its own load function (which calls
`distiller.gpu_memory.make_room_for_torch()` first), and supplies one method,

    predict_chunk(structures) -> (energy (G,), forces (A, 3), stress (G, 3, 3))   torch tensors, eV, eV/Å, eV/Å³

for a few checked structures at once (atoms of all structures concatenated; stress with ASE's sign, (1/V) dE/dε).
Everything else is here, written once:

- checks (`check`, the EnergyModel's `check_more`): every structure validated and named ("structure 3" where it
  has no name), elements outside the model's table and, for models that cannot take them, cells periodic along
  some axes only refused with a StructureError naming structure, element and teacher, before any work;
- chunking: `label` / `label_arrays` cut the structures into chunks of at most `batch_size` structures and
  `max_atoms` atoms (a larger structure goes alone), one `predict_chunk` each, inside `torch_settings` at the
  teacher's precision; every chunk's shapes are checked (never a structure lost silently) and stress is zeroed
  where the structure is not periodic or the model has none;
- GPU memory: on a CUDA device, a structure above `max_atoms` (it goes alone) is first checked to fit
  (`check_memory`): torch's peak memory per atom is measured on a cut of it of about PROBE_ATOMS atoms (same
  density: a sub-cell of a periodic structure, the atoms nearest the centre of a molecule) and, with a margin,
  scaled to its size; one that would not fit in the device's free memory is refused with a MemoryError saying
  how much it needs and how much is free, before any of the structures is labelled;
- results: `label` gives Structures with float64 energy, forces and, for periodic structures, stress (3, 3);
  `label_arrays` gives JAX arrays handed over from torch through DLPack on a GPU (`to_jax`);
- the EnergyModel (`energy_model`): `distiller.teachers.host.host_model`, i.e. `label` on the host and a
  `jax.pure_callback` into it for in-jit use, whose derivative is the teacher's own forces and stress.

torch's process-wide settings. Libraries set default dtype and float32 matmul precision (TF32) when they load or
run a model. Every entry point runs inside `torch_settings`, which sets what the teacher needs and restores the
caller's default dtype, TF32 flags and matmul precision afterwards, on both of torch's precision APIs.

Precision names (`PRECISIONS`): "float32-highest" (full float32 matmuls; the default of every torch teacher here),
"float32-high" (lets GPUs use TF32: about twice as fast, but on an H200 it moved random-weight orb-v3 forces by
~1e-3 eV/Å, noise a student would learn) and "float64" (for finite differences), where the model allows it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from ase.data import chemical_symbols

from distiller.model import EnergyModel
from distiller.structure import Structure, StructureError
from distiller.teachers.host import host_model

PRECISIONS = {"float32-high": torch.float32, "float32-highest": torch.float32, "float64": torch.float64}
PROBE_ATOMS = 2048  # atoms of the cut on which a large structure's memory per atom is measured
MEMORY_MARGIN = 1.3  # the measured per-atom memory times this must fit: peaks do not scale exactly linearly


# --------------------------------------------------------------------------------------------------
# Specs


def split_spec(spec: str, prefix: str, options: Sequence[str], bad: Callable[[str], Exception]) -> tuple[str, dict]:
    """`PREFIX:BODY?key=value&...` -> (BODY, {key: value}); `bad(why)` is raised for another prefix, an option
    not among `options`, or an empty value."""
    head, sep, rest = spec.partition(":")
    if head != prefix or not sep:
        raise bad(f"it does not start with '{prefix}:'")
    body, _, query = rest.partition("?")
    found = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in options or not value:
            raise bad(f"unknown option {item!r}")
        found[key] = value
    return body, found


def checkpoint_path(spec: str, body: str, names: dict[str, str], model: str, package: str) -> str:
    """The checkpoint file a spec's BODY names: a model shipped in the installed `package` (`names`: its
    name -> file) or a path; FileNotFoundError naming the spec where the file is missing."""
    if body in names:
        if not os.path.isfile(names[body]):
            raise FileNotFoundError(f"teacher {spec!r}: {package.split('==')[0]}'s checkpoint {names[body]} is missing "
                                    f"from the installed package (reinstall {package})")
        return names[body]
    checkpoint = os.path.expanduser(body)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"teacher {spec!r}: no {model} checkpoint file {checkpoint} (known names: "
                                f"{', '.join(names)})")
    return checkpoint


# --------------------------------------------------------------------------------------------------
# GPU memory


def memory_probe(structure: Structure, atoms: int = PROBE_ATOMS) -> Structure:
    """A cut of about `atoms` atoms of a structure at its density: for a periodic one the atoms whose fractional
    coordinates lie below f along every axis, in the cell scaled by f (f³ = atoms / n); for a molecule the atoms
    nearest its centre. Its labels mean nothing (molecules cut at the new faces); its memory per atom is the
    structure's."""
    n = structure.n_atoms
    if n <= atoms:
        return structure
    if structure.periodic:
        fraction = (atoms / n) ** (1 / 3)
        scaled = np.linalg.solve(structure.cell.T, structure.positions.T).T % 1.0
        keep = np.all(scaled < fraction, axis=1)
        return Structure(numbers=structure.numbers[keep], positions=structure.positions[keep],
                         cell=structure.cell * fraction, pbc=structure.pbc, name=f"{structure.name} (memory probe)")
    distance = np.linalg.norm(structure.positions - structure.positions.mean(0), axis=1)
    keep = np.sort(np.argsort(distance)[:atoms])
    return Structure(numbers=structure.numbers[keep], positions=structure.positions[keep], cell=structure.cell,
                     pbc=structure.pbc, name=f"{structure.name} (memory probe)")


def memory_verdict(teacher: str, structure: Structure, bytes_per_atom: float, probe_atoms: int, free: int,
                   device: str) -> None:
    """Raise MemoryError if `structure` would need more than `free` bytes at `bytes_per_atom` (with the margin)."""
    needed = MEMORY_MARGIN * bytes_per_atom * structure.n_atoms
    if needed > free:
        gib = 2.0**30
        raise MemoryError(
            f"structure '{structure.name}' ({structure.n_atoms:,} atoms) needs about {needed / gib:.1f} GiB on "
            f"{device} for teacher {teacher} ({bytes_per_atom / 2**10:.0f} KiB per atom measured on a "
            f"{probe_atoms:,}-atom cut of it, x{MEMORY_MARGIN}), but {free / gib:.1f} GiB are free; label it on a "
            f"GPU of its own, in a process without JAX, or split it")


# --------------------------------------------------------------------------------------------------
# torch's process-wide settings


class TorchState(NamedTuple):
    """torch's process-wide settings that model libraries change, as the (legacy) getters read them."""

    default_dtype: torch.dtype
    matmul_tf32: bool
    cudnn_tf32: bool
    matmul_precision: str


def torch_state() -> TorchState:
    """Raises RuntimeError where the caller set TF32 through torch's newer `fp32_precision` API (torch >= 2.9
    then refuses the legacy getters); `torch_settings` handles that case through `fp32_precisions`."""
    return TorchState(torch.get_default_dtype(), torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())


# torch >= 2.9's fine-grained precision settings, as paths under torch.backends ("" is torch.backends itself).
_FP32_PRECISION_PATHS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                         "mkldnn.conv", "mkldnn.rnn")


def _backend(path: str):
    return functools.reduce(getattr, filter(None, path.split(".")), torch.backends)


def fp32_precisions() -> dict[str, str]:
    """The newer API's `fp32_precision` of every backend that has one (empty on older torch)."""
    out = {}
    for path in _FP32_PRECISION_PATHS:
        try:
            out[path] = _backend(path).fp32_precision
        except AttributeError:
            pass
    return out


def _set_legacy(saved: TorchState) -> None:
    torch.set_default_dtype(saved.default_dtype)
    torch.set_float32_matmul_precision(saved.matmul_precision)  # also sets the matmul TF32 flag
    # A redundant write of a TF32 flag is not harmless: it can leave torch's two views "mixed".
    for backend, value in ((torch.backends.cuda.matmul, saved.matmul_tf32), (torch.backends.cudnn, saved.cudnn_tf32)):
        try:
            same = backend.allow_tf32 == value
        except RuntimeError:
            same = False
        if not same:
            backend.allow_tf32 = value


def _set_fp32_precisions(values: dict[str, str]) -> None:
    for path, value in values.items():
        if _backend(path).fp32_precision != value:
            _backend(path).fp32_precision = value


def _legacy_state_or_none() -> TorchState | None:
    try:
        return torch_state()
    except RuntimeError:  # the newer API is in use
        return None


def _restore(legacy: TorchState | None, newer: dict[str, str], dtype: torch.dtype) -> None:
    """Back to the state read on entry. torch >= 2.9 keeps two views of the precision settings: the legacy one
    (what the model libraries write and `torch_state` reads) and the newer per-backend one, which holds a little
    more ("none": not set, vs "ieee"). Writing the newer one makes torch refuse the legacy getters afterwards,
    so a caller who could read them keeps that: the legacy values are restored first, the newer ones only where
    that leaves the legacy getters answering as they did on entry."""
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if legacy is not None and _legacy_state_or_none() != legacy:
        _set_legacy(legacy)
    if fp32_precisions() != newer:
        _set_fp32_precisions(newer)
        if legacy is not None and _legacy_state_or_none() != legacy:
            _set_legacy(legacy)  # e.g. "none" came back as "ieee": the same precision


@contextlib.contextmanager
def torch_settings(dtype: torch.dtype | None = None, matmul_precision: str | None = None) -> Iterator[None]:
    """Run with this default dtype and float32 matmul precision ("high" | "highest"); restore the caller's
    default dtype, TF32 flags and matmul precision afterwards (see `_restore`), also whatever a library changed
    inside."""
    dtype_before, legacy, newer = torch.get_default_dtype(), _legacy_state_or_none(), fp32_precisions()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        if matmul_precision is not None and legacy is not None:
            if matmul_precision != legacy.matmul_precision:
                torch.set_float32_matmul_precision(matmul_precision)
        elif matmul_precision is not None:  # stay on the caller's (newer) API
            value = "ieee" if matmul_precision == "highest" else "tf32"
            _set_fp32_precisions({"cuda.matmul": value, "mkldnn.matmul": value})
        yield
    finally:
        _restore(legacy, newer, dtype_before)


def default_device(device: str | None) -> str:
    """The device a teacher runs on: the one asked for, else "cuda" where torch sees a GPU, else "cpu"."""
    return str(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------------
# torch <-> JAX


def _jax_has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:  # no GPU backend in this JAX
        return False


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array: through DLPack (no copy) when it lives on a GPU that JAX also sees,
    through numpy otherwise. float64 becomes float32 unless JAX runs with x64 enabled."""
    tensor = tensor.detach()
    if tensor.dtype == torch.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        tensor = tensor.to(torch.float32)
    if tensor.device.type == "cuda" and _jax_has_gpu():
        return jax.dlpack.from_dlpack(tensor.contiguous())
    return jnp.asarray(tensor.cpu().numpy())


def from_jax(array: jax.Array, device: str | torch.device | None = None) -> torch.Tensor:
    """A JAX array as a torch tensor: through DLPack (no copy) from a GPU, through numpy from the host;
    then moved to `device` if given."""
    if isinstance(array, jax.Array) and all(d.platform == "gpu" for d in array.devices()):
        tensor = torch.utils.dlpack.from_dlpack(array)
    else:
        tensor = torch.from_numpy(np.array(array))  # a copy: JAX's host buffers are read-only
    return tensor if device is None else tensor.to(device)


def voigt_to_matrices(voigt: torch.Tensor, order: str = "xx yy zz yz xz xy") -> torch.Tensor:
    """(G, 6) Voigt stresses in the given component order (ASE's by default) -> (G, 3, 3) symmetric matrices."""
    columns = dict(zip(order.split(), voigt.unbind(-1)))
    rows = [[columns[a + b] if a + b in columns else columns[b + a] for b in "xyz"] for a in "xyz"]
    return torch.stack([c for row in rows for c in row], -1).reshape(*voigt.shape[:-1], 3, 3)


# --------------------------------------------------------------------------------------------------
# The teacher


def describe_elements(elements: frozenset[int]) -> str:
    """'Z = 1..83, 89..94': a set of atomic numbers as runs, for error messages."""
    zs, runs = sorted(elements), []
    for z in zs:
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    return "Z = " + ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchTeacher(abc.ABC):
    """A PyTorch model behind distiller's teacher protocol (module docstring). Host-only: no JAX params.

    Subclasses add their own fields (their model's settings), set `library` (its name, for messages) and
    `partial_pbc` (whether it takes cells periodic along some axes only), and implement `predict_chunk`;
    `check_structure` adds checks of their own (e.g. charge and spin)."""

    spec: str
    cutoff: float  # Å
    elements: frozenset[int] = dataclasses.field(repr=False)  # the atomic numbers the model knows
    precision: str = "float32-highest"  # a key of PRECISIONS
    device: str = "cpu"
    has_stress: bool = True  # False: periodic structures get no stress
    model: Any = dataclasses.field(default=None, compare=False, repr=False)

    library: ClassVar[str] = "the model"
    partial_pbc: ClassVar[bool] = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"teacher {self.spec}: unknown precision {self.precision!r} "
                             f"(known: {', '.join(PRECISIONS)})")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def matmul_precision(self) -> str:
        return "high" if self.precision == "float32-high" else "highest"

    # ---- what a subclass supplies ---------------------------------------------------------------

    @abc.abstractmethod
    def predict_chunk(self, chunk: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(energy (G,) eV, forces (A, 3) eV/Å, stress (G, 3, 3) eV/Å³ with ASE's sign) of checked structures,
        as tensors on the teacher's device. Runs inside `torch_settings(self.dtype, self.matmul_precision)`;
        stress of non-periodic structures may be anything (it is zeroed)."""

    def check_structure(self, structure: Structure) -> None:
        """More checks of one validated, named structure than the bridge's (raise StructureError naming it)."""

    # ---- checks ---------------------------------------------------------------------------------

    def check(self, structures: Sequence[Structure]) -> None:
        """Raise StructureError naming the first structure the model cannot take: an element outside its table,
        periodicity along some axes only (unless the model takes it), or a subclass's own check."""
        for s in structures:
            unknown = sorted(set(int(z) for z in np.asarray(s.numbers)) - self.elements)
            if unknown:
                z = unknown[0]
                symbol = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"
                raise StructureError(f"structure '{s.name}' contains element {symbol} (Z={z}) which teacher "
                                     f"{self.spec} does not know (knows {describe_elements(self.elements)})")
            if s.periodic and not np.all(s.pbc) and not self.partial_pbc:
                raise StructureError(f"structure '{s.name}': pbc {np.asarray(s.pbc).tolist()} is periodic along some "
                                     f"axes only, which {self.library} does not support; pad it with vacuum and make "
                                     f"it fully periodic, or non-periodic")
            self.check_structure(s)

    def prepared(self, structures: Sequence[Structure]) -> list[Structure]:
        """The structures named ("structure k" where unnamed), validated and checked: errors before any work."""
        named = [s if s.name else s.replace(name=f"structure {k}") for k, s in enumerate(structures)]
        named = [s.validated() for s in named]
        self.check(named)
        return named

    # ---- prediction -----------------------------------------------------------------------------

    def _checked_chunk(self, chunk: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch_settings(self.dtype, self.matmul_precision):
            energy, forces, stress = self.predict_chunk(chunk)
        energy, forces, stress = energy.detach().reshape(-1), forces.detach(), stress.detach()
        n_atoms = sum(s.n_atoms for s in chunk)
        # Never lose a structure silently.
        if energy.shape != (len(chunk),) or forces.shape != (n_atoms, 3) or stress.shape != (len(chunk), 3, 3):
            raise RuntimeError(f"teacher {self.spec}: {len(chunk)} structures with {n_atoms} atoms gave energy "
                               f"{tuple(energy.shape)}, forces {tuple(forces.shape)} and stress "
                               f"{tuple(stress.shape)}")
        with_stress = torch.tensor([s.periodic and self.has_stress for s in chunk], device=stress.device)
        return energy, forces, torch.where(with_stress[:, None, None], stress, torch.zeros_like(stress))

    def chunks(self, structures: Sequence[Structure], batch_size: int = 32, max_atoms: int = 4096):
        """Yield (chunk, energy, forces, stress) tensors for prepared structures: chunks of at most batch_size
        structures and max_atoms atoms (a larger structure goes alone), one `predict_chunk` each."""
        if batch_size < 1 or max_atoms < 1:
            raise ValueError(f"batch_size and max_atoms must be >= 1, got {batch_size} and {max_atoms}")
        chunk, count = [], 0
        for s in structures:
            if chunk and (len(chunk) == batch_size or count + s.n_atoms > max_atoms):
                yield (chunk, *self._checked_chunk(chunk))
                chunk, count = [], 0
            chunk.append(s)
            count += s.n_atoms
        if chunk:
            yield (chunk, *self._checked_chunk(chunk))

    # ---- GPU memory -----------------------------------------------------------------------------

    def check_memory(self, structures: Sequence[Structure], max_atoms: int = 4096) -> None:
        """On a CUDA device: raise MemoryError (module docstring) if a structure above `max_atoms`, which is
        labelled alone, would not fit in the device's free memory. Elsewhere nothing is checked."""
        if not str(self.device).startswith("cuda"):
            return
        large = [s for s in structures if s.n_atoms > max(max_atoms, PROBE_ATOMS)]
        if not large:
            return
        largest = max(large, key=lambda s: s.n_atoms)
        probe = memory_probe(largest)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._checked_chunk([probe])
        torch.cuda.synchronize(self.device)
        bytes_per_atom = (torch.cuda.max_memory_allocated(self.device) - before) / probe.n_atoms
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        memory_verdict(self.spec, largest, bytes_per_atom, probe.n_atoms, free, str(self.device))

    # ---- public ---------------------------------------------------------------------------------

    def label(self, structures: Sequence[Structure], batch_size: int = 32, max_atoms: int = 4096) -> list[Structure]:
        """The structures with energy (eV), forces (eV/Å) and, for periodic ones, stress (eV/Å³, (3, 3))."""
        prepared = self.prepared(structures)
        self.check_memory(prepared, max_atoms)
        energies, forces, stresses = [], [], []
        for chunk, energy, force, stress in self.chunks(prepared, batch_size, max_atoms):
            energies.extend(energy.to("cpu", torch.float64).numpy())
            stresses.extend(stress.to("cpu", torch.float64).numpy())
            forces.extend(np.split(force.to("cpu", torch.float64).numpy(), np.cumsum([s.n_atoms for s in chunk])[:-1]))
        assert len(energies) == len(forces) == len(structures), (len(energies), len(structures))
        # The caller's structures (names included) with labels; no stress where the model or the cell has none.
        return [s.replace(energy=float(e), forces=f, stress=sigma if (s.periodic and self.has_stress) else None)
                for s, e, f, sigma in zip(structures, energies, forces, stresses)]

    def label_arrays(self, structures: Sequence[Structure], batch_size: int = 32,
                     max_atoms: int = 4096) -> dict[str, jax.Array]:
        """Labels as JAX arrays, handed over from torch through DLPack on a GPU: energy (G,) eV, forces (A, 3)
        eV/Å (atoms of all structures concatenated), stress (G, 3, 3) eV/Å³ and stress_mask (G,)."""
        prepared = self.prepared(structures)
        self.check_memory(prepared, max_atoms)
        parts = list(self.chunks(prepared, batch_size, max_atoms))
        if not parts:
            raise ValueError("label_arrays needs at least one structure")
        energy, forces, stress = (torch.cat([p[k] for p in parts]) for k in (1, 2, 3))
        assert energy.shape[0] == len(structures) and forces.shape[0] == sum(s.n_atoms for s in structures)
        mask = np.array([s.periodic and self.has_stress for s in prepared])
        return {"energy": to_jax(energy), "forces": to_jax(forces), "stress": to_jax(stress),
                "stress_mask": jnp.asarray(mask)}

    def energy_model(self) -> EnergyModel:
        """This teacher as an EnergyModel (host-only: `label`, and its pure_callback form for in-jit use)."""
        return host_model(self.spec, self.label, cutoff=self.cutoff, elements=self.elements, check_more=self.check,
                          source=self)


def energy_model(teacher: TorchTeacher) -> EnergyModel:
    """A loaded torch teacher as an EnergyModel."""
    return teacher.energy_model()
