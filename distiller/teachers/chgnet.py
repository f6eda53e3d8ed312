"""CHGNet (chgnet, PyTorch, crystal graph with a bond/angle line graph) as a distiller teacher, through the torch
bridge.

    load_chgnet("chgnet:0.3.0")                    CHGNet 0.3.0 (Oct 2023; MPtrj, 89 elements, atom graph 6 Å,
                                                   bond graph 3 Å), whose checkpoint ships inside the chgnet
                                                   wheel (chgnet==0.4.2): it runs offline
    load_chgnet("chgnet:/path/model.pth.tar")      any CHGNet checkpoint file (`CHGNet.from_file`)
    options  ?precision=float32-highest (default) | float32-high | float64

The conventions are those of chgnet's own ASE calculator (chgnet.model.dynamics.CHGNetCalculator, chgnet 0.4.2),
through chgnet's own functions: the model from `CHGNet.load(model_name=...)` (or `CHGNet.from_file`), a
structure's graph from the model's `graph_converter` on the pymatgen Structure that `AseAtomsAdaptor` makes of it
(per-axis pbc carried over), and one `CHGNet.forward(graphs, task="efs")` per chunk. Units are converted once, here:
- energy: CHGNet 0.3.0 is intensive (`is_intensive`: it predicts eV/atom); times the atom count -> eV;
- forces: -dE/dx, eV/Å as they come;
- stress: CHGNet gives (1/V) dE/dε (ε applied as cell @ (1 + ε)) times 160.21766208, i.e. GPa with ASE's sign
  (positive = the cell wants to shrink; checked against finite differences of the energy); divided by that same
  factor -> eV/Å³, a (3, 3) matrix. The calculator multiplies by `ase.units.GPa` instead, 8e-9 relative apart.
Magnetic moments (CHGNet's "m" head) are not predicted: they are no label distiller learns, and their head is
off the energy's path (the energy, forces and stress are the same without it).

Cells. CHGNet is trained on periodic crystals and its graph converter needs a non-singular lattice. A molecule
(no periodic axis; its cell may be empty) is placed in a fully periodic cubic box whose side is its largest
extent plus the atom-graph cutoff plus 1 Å: no atom then sees a periodic image, and since CHGNet's graph is a
cutoff graph, energy and forces are exactly those of the isolated molecule (what the calculator gives for it in
such a box). No stress is returned for it. Out of distribution (MPtrj has no isolated molecules), but defined.
Cells periodic along some axes only keep their pbc (stress is then the strain derivative over the cell's whole
volume, as the calculator gives it).
Singular periodic cells are refused by `Structure.validated`, unknown elements by the bridge, each naming the
structure. Atoms without a neighbour within 6 Å are labelled (chgnet's converter is told not to print about
them: it is the structure's property, not an error).

Elements. CHGNet's tables have 94 rows (H..Pu), but MPtrj has no Po, At, Rn, Fr or Ra (Z = 84..88): their
embeddings are untrained (a norm of ~8 against ~18-32 for every other row), so `chgnet:0.3.0` knows Z = 1..83,
89..94, as the MPtrj-trained SevenNet-0 does. A checkpoint file does not record what it was trained on: a
`chgnet:PATH` teacher takes every element of its embedding table.

float64. chgnet builds graphs in float32 (`TORCH_DTYPE`) and its composition model (per-element reference
energies, `AtomRef`) casts its features with `.float()`. For precision=float64 the model is cast, each graph's
fractional coordinates and lattice are made again from pymatgen's float64 arrays (a cast of chgnet's float32
copies would keep their rounding, ~5e-7 Å, which finite differences magnify: 0.5 % force errors at h = 1e-5 Å),
and a forward pre-hook casts AtomRef's input to float64; chgnet still takes the volume that scales stress in
float32 (a relative 6e-8). Then central differences (h = 1e-5 Å and strain, sheared and rattled 2-atom Si)
match forces to 5e-8 eV/Å and stress to 3e-9 eV/Å³, and float64 labels are float32's within 1e-6 eV, 4e-6 eV/Å
and 3e-7 eV/Å³. That is distiller's, not a chgnet feature: it exists for finite differences; label in float32,
the precision CHGNet was trained in.

Loading applies distiller.gpu_memory's policy first, so that JAX leaves room for torch on a shared GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from typing import ClassVar, Sequence

import numpy as np
import torch
from ase import Atoms

try:
    import chgnet
    from chgnet.graph import CrystalGraph
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor
except ImportError as err:  # the registry names the spec; this says what to install
    raise ImportError(f"the CHGNet teacher needs chgnet==0.4.2 (pip install 'distiller[chgnet]'): {err}") from err

from distiller.files import sha256
from distiller.gpu_memory import make_room_for_torch
from distiller.model import EnergyModel
from distiller.structure import Structure
from distiller.teachers.torch_bridge import (PRECISIONS, TorchTeacher, checkpoint_path, default_device, split_spec,
                                          torch_settings)

CHGNET_GPA = 160.21766208  # the eV/Å³ -> GPa factor chgnet's model applies to its stress (chgnet.model.model)
MPTRJ_ELEMENTS = frozenset(range(1, 84)) | frozenset(range(89, 95))  # module docstring, "Elements"
VACUUM = 1.0  # Å beyond the atom-graph cutoff between a molecule and its nearest periodic image


def pretrained_checkpoints() -> dict[str, str]:
    """Checkpoint names -> files inside the installed chgnet package (no download), as `CHGNet.load` reads them."""
    root = os.path.join(os.path.dirname(chgnet.__file__), "pretrained")
    return {"0.3.0": os.path.join(root, "0.3.0", "chgnet_0.3.0_e29f68s314m37.pth.tar")}


# --------------------------------------------------------------------------------------------------
# Specs


@dataclasses.dataclass(frozen=True)
class CHGNetSpec:
    """A parsed `chgnet:` spec: a pretrained name or a checkpoint path, with the `?precision=` option."""

    name: str  # as the spec gives it: "0.3.0" or a path
    checkpoint: str  # the file
    pretrained: bool  # a name of `pretrained_checkpoints`, loaded by `CHGNet.load`
    precision: str = "float32-highest"


def parse_spec(spec: str) -> CHGNetSpec:
    """`chgnet:NAME[?precision=...]` or `chgnet:PATH[?precision=...]` -> CHGNetSpec; a ValueError that says what
    is valid, or a FileNotFoundError for a checkpoint path that is not a file."""
    names = pretrained_checkpoints()

    def bad(why: str) -> ValueError:
        return ValueError(f"bad CHGNet teacher spec {spec!r}: {why}. Valid specs: "
                          f"{', '.join('chgnet:' + n for n in names)} or chgnet:PATH (a CHGNet checkpoint); "
                          f"option ?precision={'|'.join(PRECISIONS)}")

    body, options = split_spec(spec, "chgnet", ("precision",), bad)
    if not body:
        raise bad("no model name or checkpoint path")
    precision = options.get("precision", CHGNetSpec.precision)
    if precision not in PRECISIONS:
        raise bad(f"unknown precision {precision!r}")
    checkpoint = checkpoint_path(spec, body, names, "CHGNet", "chgnet==0.4.2")
    return CHGNetSpec(name=body, checkpoint=checkpoint, pretrained=body in names, precision=precision)


# --------------------------------------------------------------------------------------------------
# Loading


def _cast_composition_input(model, dtype: torch.dtype) -> None:
    """Make chgnet's composition model (AtomRef) take its features at `dtype` (it casts them to float32)."""
    if model.composition_model is None:  # a model without reference energies: nothing to cast
        return
    fc = getattr(model.composition_model, "fc", None)
    if not isinstance(fc, torch.nn.Linear):
        raise RuntimeError("this CHGNet model has no AtomRef composition model to cast to float64; use a float32 "
                           "precision")
    fc.register_forward_pre_hook(lambda module, inputs: tuple(x.to(dtype) for x in inputs))


def load_chgnet(spec: str, device: str | None = None) -> "CHGNetTeacher":
    """The CHGNet teacher named by `spec` (see `parse_spec`) on `device` ("cuda" where available, else "cpu")."""
    make_room_for_torch()  # JAX's GPU memory policy, before anything here can initialise JAX's backend
    parsed = parse_spec(spec)
    device = default_device(device)
    dtype = PRECISIONS[parsed.precision]
    # chgnet prints its parameter count when it builds a model: noise on a labelling command's output.
    with torch_settings(), contextlib.redirect_stdout(io.StringIO()):
        try:
            if parsed.pretrained:
                model = CHGNet.load(model_name=parsed.name, use_device="cpu", verbose=False)
            else:
                model = CHGNet.from_file(parsed.checkpoint)
        except Exception as err:  # torch.load, model arguments chgnet cannot build, missing keys: no usable model
            raise RuntimeError(f"teacher {spec!r}: cannot load the CHGNet checkpoint {parsed.checkpoint}: "
                               f"{type(err).__name__}: {err}") from err
        model.graph_converter.set_isolated_atom_response("ignore")
        model = model.to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if dtype != torch.float32:
            _cast_composition_input(model, dtype)
    table = model.atom_embedding.embedding.num_embeddings  # atomic numbers 1..table
    elements = MPTRJ_ELEMENTS if parsed.pretrained else frozenset(range(1, table + 1))
    return CHGNetTeacher(spec=spec, cutoff=float(model.graph_converter.atom_graph_cutoff), elements=elements,
                         precision=parsed.precision, device=device, model=model, checkpoint=parsed.checkpoint)


def chgnet_model(spec: str, device: str | None = None) -> EnergyModel:
    """The CHGNet teacher named by `spec` as an EnergyModel (host-only: `label`, and its pure_callback form)."""
    return load_chgnet(spec, device=device).energy_model()


# --------------------------------------------------------------------------------------------------
# The teacher


def boxed(s: Structure, cutoff: float) -> Atoms:
    """A checked structure as ASE Atoms for chgnet: a molecule in its vacuum box (module docstring, "Cells")."""
    if s.periodic:
        return Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    extent = s.positions.max(axis=0) - s.positions.min(axis=0)
    side = float(extent.max()) + cutoff + VACUUM
    return Atoms(numbers=s.numbers, positions=s.positions - s.positions.min(axis=0), cell=np.eye(3) * side, pbc=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CHGNetTeacher(TorchTeacher):
    """A CHGNet model behind distiller's Teacher protocol (the torch bridge's `TorchTeacher`). Host-only."""

    checkpoint: str  # the checkpoint file the model was built from

    library: ClassVar[str] = "chgnet"
    partial_pbc: ClassVar[bool] = True  # pymatgen's neighbour list honours per-axis pbc (checked in the tests)

    def graph(self, s: Structure) -> CrystalGraph:
        """chgnet's CrystalGraph of one checked structure, on the teacher's device, floats at its dtype."""
        crystal = AseAtomsAdaptor.get_structure(boxed(s, self.cutoff))
        graph = self.model.graph_converter(crystal)
        if self.dtype != torch.float32:  # from the float64 source: a cast of chgnet's float32 copies is rounded
            graph.atom_frac_coord = torch.tensor(crystal.frac_coords, dtype=self.dtype, requires_grad=True)
            graph.lattice = torch.tensor(crystal.lattice.matrix, dtype=self.dtype, requires_grad=True)
            graph.neighbor_image = graph.neighbor_image.to(self.dtype)  # integers: exact
        return graph.to(self.device)

    def predict_chunk(self, chunk: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(energy (G,), forces (A, 3), stress (G, 3, 3)) of checked structures, one batched model call."""
        graphs = [self.graph(s) for s in chunk]
        with torch.enable_grad(), warnings.catch_warnings():  # forces and stress are gradients, also under no_grad
            # chgnet reads each cell volume as a Python float off a tensor that requires grad (stress's scale).
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            out = self.model(graphs, task="efs")
        n_atoms = torch.tensor([s.n_atoms for s in chunk], dtype=out["e"].dtype, device=out["e"].device)
        energy = out["e"] * n_atoms if self.model.is_intensive else out["e"]
        return energy, torch.cat(out["f"]), torch.stack(out["s"]) / CHGNET_GPA


def chgnet_file_hashes(spec: str) -> dict[str, str]:
    """The sha256 of the checkpoint a `chgnet:` spec reads, by the name or path as the spec gives it."""
    parsed = parse_spec(spec)
    return {parsed.name: sha256(parsed.checkpoint)}
