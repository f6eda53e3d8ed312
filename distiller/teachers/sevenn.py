"""SevenNet (sevenn, PyTorch, NequIP-style) as a distiller teacher, through the torch bridge.

    load_sevenn("sevenn:7net-0")                   SevenNet-0 (11 Jul 2024; MPtrj, 89 elements, 5 Å), whose
                                                   checkpoint ships inside the sevenn wheel: it runs offline
    load_sevenn("sevenn:/path/checkpoint.pth")     any SevenNet checkpoint file
    options  ?precision=float32-highest (default) | float32-high | float64   &modal=NAME (multi-fidelity models)

The conventions are those of sevenn's own ASE calculator (sevenn.calculator.SevenNetCalculator, sevenn 0.13),
through sevenn's own functions: the model comes from `sevenn.util.load_checkpoint(...).build_model()` (no
accelerator backends), a structure's graph from `sevenn.train.dataload.unlabeled_atoms_to_graph` (matscipy's
neighbour list, a sevenn dependency; ASE's without it) with edge vectors computed on the host and no cell shifts
(the model differentiates its energy with respect to the edge vectors, so forces and stress are conservative);
energy `inferred_total_energy`, forces `inferred_force`, and ASE's stress as minus `inferred_stress`, whose
components come in the order (xx, yy, zz, xy, yz, zx); here as a (3, 3) matrix, eV/Å³.

Batching. The calculator evaluates one structure at a time; `label` builds every structure's AtomGraphData on the
host and collates a chunk into one torch_geometric Batch (sevenn's Collater, as its torch-sim wrapper and its
inference script do), evaluated by the model in its batched mode (`set_is_batch_data(True)`).

Cells. sevenn's graph builder takes cells periodic along some axes only, so SevenNet does too (stress is then the
strain derivative over the cell's whole volume, as the calculator gives it). Molecules need no cell; their stress
(sevenn divides by a volume clamped to 1e-3 Å³) is not returned. Singular periodic cells are refused by
`Structure.validated`, unknown elements by the bridge, each naming the structure.

float64. sevenn's one-hot embedding always emits float32 (`OnehotEmbedding` calls `.float()`), so a model cast to
float64 stops at its first linear layer; for precision=float64 a forward hook casts that embedding's output to
float64, after which every tensor of the model is float64 (energies within 2e-5 eV of float32's for aspirin and
8-atom Si, forces within 3e-6 eV/Å). That is distiller's, not a sevenn feature (sevenn's torch-sim wrapper
accepts float32 only): it exists for finite differences; label in float32, the precision SevenNet was trained in.

Loading applies distiller.gpu_memory's policy first, so that JAX leaves room for torch on a shared GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Sequence

import torch
from ase import Atoms

with warnings.catch_warnings():
    # sevenn's layers decorate functions with torch.jit.script at import, which torch deprecates: not the user's to fix.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
    try:
        import sevenn._keys as KEY
        from sevenn import _const
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.nn.node_embedding import OnehotEmbedding
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from sevenn.util import dtype_correct, load_checkpoint
        from torch_geometric.loader.dataloader import Collater
    except ImportError as err:  # the registry names the spec; this says what to install
        raise ImportError(f"the SevenNet teacher needs sevenn==0.13.0 (pip install 'distiller[sevenn]'): "
                          f"{err}") from err

from distiller.files import sha256
from distiller.gpu_memory import make_room_for_torch
from distiller.model import EnergyModel
from distiller.structure import Structure
from distiller.teachers.torch_bridge import (PRECISIONS, TorchTeacher, checkpoint_path, default_device, split_spec,
                                             torch_settings, voigt_to_matrices)


def pretrained_checkpoints() -> dict[str, str]:
    """Checkpoint names -> files inside the installed sevenn package (no download)."""
    return {"7net-0": _const.SEVENNET_0_11Jul2024}


# --------------------------------------------------------------------------------------------------
# Specs


@dataclasses.dataclass(frozen=True)
class SevenNetSpec:
    """A parsed `sevenn:` spec: a checkpoint name or path, with `?key=value&...` options precision and modal."""

    name: str  # as the spec gives it: "7net-0" or a path
    checkpoint: str  # the file
    precision: str = "float32-highest"
    modal: str | None = None


def parse_spec(spec: str) -> SevenNetSpec:
    """`sevenn:NAME[?options]` or `sevenn:PATH[?options]` -> SevenNetSpec; a ValueError that says what is valid,
    or a FileNotFoundError for a checkpoint path that is not a file."""
    names = pretrained_checkpoints()

    def bad(why: str) -> ValueError:
        return ValueError(f"bad SevenNet teacher spec {spec!r}: {why}. Valid specs: "
                          f"{', '.join('sevenn:' + n for n in names)} or sevenn:PATH.pth (a SevenNet checkpoint); "
                          f"options ?precision={'|'.join(PRECISIONS)}, modal=NAME")

    body, options = split_spec(spec, "sevenn", ("precision", "modal"), bad)
    if not body:
        raise bad("no checkpoint name or path")
    if options.get("precision", SevenNetSpec.precision) not in PRECISIONS:
        raise bad(f"unknown precision {options['precision']!r}")
    checkpoint = checkpoint_path(spec, body, names, "SevenNet", "sevenn==0.13.0")
    return SevenNetSpec(name=body, checkpoint=checkpoint, precision=options.get("precision", SevenNetSpec.precision),
                        modal=options.get("modal"))


# --------------------------------------------------------------------------------------------------
# Loading


def _cast_one_hot(model, dtype: torch.dtype) -> None:
    """Make sevenn's one-hot embeddings emit `dtype` (they emit float32 whatever the model's dtype)."""
    def cast(module, inputs, data):
        for key in {module.key_output, module.key_additional_output} - {None}:
            data[key] = data[key].to(dtype)
        return data

    embeddings = [m for m in model.modules() if isinstance(m, OnehotEmbedding)]
    if not embeddings:
        raise RuntimeError("this SevenNet model has no OnehotEmbedding to cast to float64; use a float32 precision")
    for module in embeddings:
        module.register_forward_hook(cast)


def _checked_modal(spec: str, model, modal: str | None) -> str | None:
    """The calculator's rules: a multi-fidelity model needs one of its modals, others take none."""
    available = list(model.modal_map or {})
    if available and modal is None:
        raise ValueError(f"teacher {spec!r}: this multi-fidelity model needs ?modal=NAME, one of {available}")
    if modal is not None and modal not in available:
        raise ValueError(f"teacher {spec!r}: unknown modal {modal!r} "
                         f"({'known: ' + ', '.join(available) if available else 'the model has no modals'})")
    return modal


def load_sevenn(spec: str, device: str | None = None) -> "SevenNetTeacher":
    """The SevenNet teacher named by `spec` (see `parse_spec`) on `device` ("cuda" where available, else "cpu")."""
    make_room_for_torch()  # JAX's GPU memory policy, before anything here can initialise JAX's backend
    parsed = parse_spec(spec)
    device = default_device(device)
    dtype = PRECISIONS[parsed.precision]
    with torch_settings(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sevenn's hints about optional accelerator backends
        try:
            model = load_checkpoint(parsed.checkpoint).build_model()
        except Exception as err:  # torch.load, a config sevenn cannot build, missing keys: no usable model
            raise RuntimeError(f"teacher {spec!r}: cannot load the SevenNet checkpoint {parsed.checkpoint}: "
                               f"{type(err).__name__}: {err}") from err
        if not model.type_map or not model.cutoff:
            raise RuntimeError(f"teacher {spec!r}: the checkpoint {parsed.checkpoint} has no type map or cutoff")
        modal = _checked_modal(spec, model, parsed.modal)
        model.set_is_batch_data(True)
        model = model.to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if dtype != torch.float32:
            _cast_one_hot(model, dtype)
    return SevenNetTeacher(spec=spec, cutoff=float(model.cutoff), elements=frozenset(int(z) for z in model.type_map),
                           precision=parsed.precision, device=device, model=model, checkpoint=parsed.checkpoint,
                           modal=modal)


def sevenn_model(spec: str, device: str | None = None) -> EnergyModel:
    """The SevenNet teacher named by `spec` as an EnergyModel (host-only: `label`, and its pure_callback form)."""
    return load_sevenn(spec, device=device).energy_model()


# --------------------------------------------------------------------------------------------------
# The teacher


@dataclasses.dataclass(frozen=True, kw_only=True)
class SevenNetTeacher(TorchTeacher):
    """A SevenNet model behind distiller's Teacher protocol (the torch bridge's `TorchTeacher`). Host-only."""

    checkpoint: str  # the checkpoint file the model was built from
    modal: str | None = None  # the fidelity of a multi-fidelity model

    library: ClassVar[str] = "sevenn"
    partial_pbc: ClassVar[bool] = True  # sevenn's graph builder takes any pbc (checked against its calculator)

    def graph(self, s: Structure) -> Any:
        """sevenn's AtomGraphData of one checked structure, on the host, floats at the teacher's dtype."""
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        arrays = unlabeled_atoms_to_graph(atoms, self.cutoff, with_shift=False)
        data = AtomGraphData(**{k: dtype_correct(v, float_dtype=self.dtype) for k, v in arrays.items()})
        if self.modal is not None:
            data[KEY.DATA_MODALITY] = self.modal
        return data

    def batch(self, structures: Sequence[Structure]) -> Any:
        """The checked structures' graphs as one torch_geometric Batch on the teacher's device."""
        graphs = [self.graph(s) for s in structures]
        return Collater([], follow_batch=None, exclude_keys=None)(graphs).to(self.device)

    def predict_chunk(self, chunk: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(energy (G,), forces (A, 3), stress (G, 3, 3)) of checked structures, one batched model call."""
        with torch.enable_grad():  # forces and stress are gradients, also under a caller's no_grad
            out = self.model(self.batch(chunk))
        energy = out[KEY.PRED_TOTAL_ENERGY]
        if KEY.PRED_FORCE not in out:  # no edge in the whole chunk: the energy does not depend on the positions
            n_atoms = sum(s.n_atoms for s in chunk)
            return (energy, torch.zeros((n_atoms, 3), dtype=energy.dtype, device=energy.device),
                    torch.zeros((len(chunk), 3, 3), dtype=energy.dtype, device=energy.device))
        stress = voigt_to_matrices(-out[KEY.PRED_STRESS].reshape(len(chunk), 6), order="xx yy zz xy yz zx")
        return energy, out[KEY.PRED_FORCE], stress


def sevenn_file_hashes(spec: str) -> dict[str, str]:
    """The sha256 of the checkpoint a `sevenn:` spec reads, by the name or path as the spec gives it."""
    parsed = parse_spec(spec)
    return {parsed.name: sha256(parsed.checkpoint)}

