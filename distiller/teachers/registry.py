"""Teacher specs -> EnergyModel.

    fennol-pmc:ani1x      the 8-member ANI-1x ensemble of the FeNNol pre-trained models collection
    fennol-pmc:ani1x/3    one member of it
    fennol:PATH.fnx       any FeNNol model file
    orb:...               Orb models (distiller.teachers.orb.load_orb, imported only when asked for)
    sevenn:7net-0         SevenNet-0, shipped in the sevenn wheel; sevenn:PATH.pth any SevenNet checkpoint
                          (distiller.teachers.sevenn.load_sevenn, likewise)
    chgnet:0.3.0          CHGNet 0.3.0, shipped in the chgnet wheel; chgnet:PATH any CHGNet checkpoint
                          (distiller.teachers.chgnet.load_chgnet, likewise)
    ase:module.Class      any ASE calculator (distiller.teachers.ase_teacher.load_ase, likewise)

FeNNol-PMC teachers are loaded once per process and spec: their files are checksummed, so a spec always means
the same weights, and one model object lets every labelling, MD and training call share compilations.

FeNNol-PMC files are looked up, in order: in $FENNOL_PMC_DIR, in the user cache
($XDG_CACHE_HOME/distiller/fennol-pmc, else ~/.cache/distiller/fennol-pmc), then downloaded from the
FeNNol-PMC GitHub repository (pinned commit; $FENNOL_PMC_URL overrides the base URL, e.g. a mirror or a
file:// copy) into the cache. Every file is checked against the sha256 recorded here, wherever it was
found. DISTILLER_OFFLINE=1 forbids the download.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
import urllib.error
import urllib.request
from typing import Callable

from distiller.files import replaced, sha256
from distiller.model import EnergyModel

PMC_REPOSITORY = "thomasple/FeNNol-PMC"
PMC_COMMIT = "dd3f8c9fad179b851960cf4aa65e30bd5318b556"  # a commit holding the ANI .fnx files (not in Git LFS)
PMC_URL = f"https://raw.githubusercontent.com/{PMC_REPOSITORY}/{PMC_COMMIT}/"
PMC_REMOTE_PREFIX = "ANI/"  # the repository keeps ANI1X/ under ANI/; locally ANI1X/ sits at the top

# Ensembles of the collection: name -> member files, relative to the local FeNNol-PMC directory.
PMC_MODELS: dict[str, tuple[str, ...]] = {
    "ani1x": tuple(f"ANI1X/ani1x_model{k}.fnx" for k in range(8)),
}

PMC_SHA256: dict[str, str] = {
    "ANI1X/ani1x_model0.fnx": "7d1b256b383041db11b0d448873b61e5e58eb76f8d60d416e0e89b4686a27e86",
    "ANI1X/ani1x_model1.fnx": "03aacd04d46d3a20d15e0dfcb14056a464073ddea8399598e501e4a58e737504",
    "ANI1X/ani1x_model2.fnx": "7425c078e966ace366f8c37de2517297d2be9c3479eab564e6f6ac42dd2c5a33",
    "ANI1X/ani1x_model3.fnx": "92f6c523fc7bc6c613e27bcfbafbb39044267fcf6ae34e2847453f26ca6c3ba5",
    "ANI1X/ani1x_model4.fnx": "b9a8291eb7c92e4a4212578bf263d30ee690ce724bccd17548bad47e6967a166",
    "ANI1X/ani1x_model5.fnx": "87cc2415ef448a0534aa3e4cced3f9338721245b5921d2c92e3202ba525be562",
    "ANI1X/ani1x_model6.fnx": "9213ed8136cdfc7f3116ebe6ed3678dc0b9d1fdc5eb4180ac90a8c54b31d59f3",
    "ANI1X/ani1x_model7.fnx": "17799e691c9395a9899e0d743083e6ac9e9c616561bbda86e9c33ae31200af73",
}


class ChecksumError(ValueError):
    """A model file whose content is not the one recorded for it."""


# --------------------------------------------------------------------------------------------------
# Spec prefixes


Loader = Callable[[str], EnergyModel]
_LOADERS: dict[str, Loader] = {}
# Prefixes whose loader lives in a module with heavy dependencies (PyTorch...): imported on first use.
_LAZY: dict[str, tuple[str, str]] = {
    "orb": ("distiller.teachers.orb", "orb_model"),
    "sevenn": ("distiller.teachers.sevenn", "sevenn_model"),
    "chgnet": ("distiller.teachers.chgnet", "chgnet_model"),
    "ase": ("distiller.teachers.ase_teacher", "load_ase"),
}

# Prefixes of PyTorch teachers: a process that loads one shares the GPU with JAX (distiller.gpu_memory).
TORCH_PREFIXES = frozenset({"orb", "sevenn", "chgnet"})


def is_torch_spec(spec) -> bool:
    """Whether `spec` names a PyTorch teacher."""
    return isinstance(spec, str) and spec.partition(":")[0] in TORCH_PREFIXES


def register(prefix: str, loader: Loader) -> None:
    """Make `prefix:...` specs load with `loader(spec)`, which returns an EnergyModel."""
    _LOADERS[prefix] = loader


def load_teacher(spec: str) -> EnergyModel:
    """Resolve a teacher spec to its EnergyModel."""
    prefix, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"teacher spec {spec!r} is not of the form PREFIX:NAME (prefixes: {', '.join(known_prefixes())})")
    loader = _LOADERS.get(prefix)
    if loader is None and prefix in _LAZY:
        module_name, function = _LAZY[prefix]
        try:
            loader = getattr(importlib.import_module(module_name), function)
        except ImportError as err:
            raise ImportError(f"teacher spec {spec!r} needs {module_name} ({err})") from err
    if loader is None:
        raise ValueError(f"unknown teacher prefix {prefix!r} in {spec!r} (known: {', '.join(known_prefixes())})")
    model = loader(spec)
    if not isinstance(model, EnergyModel):
        raise TypeError(f"the loader of {prefix!r} returned {type(model).__name__} for {spec!r}, not an EnergyModel")
    return model


def known_prefixes() -> list[str]:
    return sorted(set(_LOADERS) | set(_LAZY))


def teacher_files(spec: str) -> dict[str, str]:
    """The sha256 of every model file a teacher spec reads, by file name: what a dataset or a run records, so that
    it refuses to be extended or resumed with other weights under the same spec. FeNNol-PMC files are checked
    against the recorded sums whenever they load; a `fennol:PATH` file and a SevenNet or CHGNet checkpoint (by the
    name or path the spec gives) are hashed here. Teachers whose weights are not a file named by the spec (Orb, ASE
    calculators) give {}."""
    prefix, _, rest = spec.partition(":")
    if prefix == "fennol-pmc":
        return {f: PMC_SHA256[f] for f in pmc_files(spec)}
    if prefix == "fennol":
        path = os.path.expanduser(rest)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher {spec!r}: no file {path}")
        return {rest: sha256(path)}  # by the path as the spec names it: the same on every machine of a job
    if prefix == "sevenn":
        from distiller.teachers.sevenn import sevenn_file_hashes

        return sevenn_file_hashes(spec)
    if prefix == "chgnet":
        from distiller.teachers.chgnet import chgnet_file_hashes

        return chgnet_file_hashes(spec)
    return {}


# --------------------------------------------------------------------------------------------------
# FeNNol


def _load_fennol_file(spec: str):
    from distiller.teachers.fennol import load_fennol

    path = spec.split(":", 1)[1]
    return load_fennol([os.path.expanduser(path)], spec)


def pmc_files(spec: str) -> tuple[str, ...]:
    """The FeNNol-PMC files (relative names) of a `fennol-pmc:NAME[/MEMBER]` spec: the ensemble's or one member's."""
    name, _, member = spec.split(":", 1)[1].partition("/")
    if name not in PMC_MODELS:
        raise ValueError(f"unknown FeNNol-PMC model {name!r} in {spec!r} (known: {', '.join(sorted(PMC_MODELS))})")
    files = PMC_MODELS[name]
    if member:
        if not member.isdigit() or int(member) >= len(files):
            raise ValueError(f"{spec!r}: member must be an integer in 0..{len(files) - 1}")
        files = (files[int(member)],)
    return files


def _load_fennol_pmc(spec: str):
    files = pmc_files(spec)
    return _pmc_model(tuple(str(pmc_file(f)) for f in files), spec)  # every file checksummed, every time


@functools.lru_cache(maxsize=8)
def _pmc_model(paths: tuple[str, ...], spec: str) -> EnergyModel:
    from distiller.teachers.fennol import load_fennol

    return load_fennol(list(paths), spec)


register("fennol", _load_fennol_file)
register("fennol-pmc", _load_fennol_pmc)


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "distiller" / "fennol-pmc"


def _verified(path: pathlib.Path, relative: str) -> pathlib.Path:
    expected = PMC_SHA256[relative]
    actual = sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match the recorded {expected} for FeNNol-PMC {relative} "
            f"(corrupt or different file; delete it to have it downloaded again)"
        )
    return path


def pmc_file(relative: str) -> pathlib.Path:
    """Local path of a FeNNol-PMC file (FENNOL_PMC_DIR, then the cache, then a download), checksum-verified."""
    if relative not in PMC_SHA256:
        raise ValueError(f"no checksum recorded for FeNNol-PMC file {relative}")
    tried = []
    env = os.environ.get("FENNOL_PMC_DIR")
    if env:
        candidate = pathlib.Path(env) / relative
        if candidate.is_file():
            return _verified(candidate, relative)
        tried.append(f"$FENNOL_PMC_DIR: {candidate}")
    else:
        tried.append("$FENNOL_PMC_DIR: not set")
    cached = cache_dir() / relative
    if cached.is_file():
        return _verified(cached, relative)
    tried.append(f"cache: {cached}")
    url = os.environ.get("FENNOL_PMC_URL", PMC_URL).rstrip("/") + "/" + PMC_REMOTE_PREFIX + relative
    if os.environ.get("DISTILLER_OFFLINE", "") not in ("", "0"):
        tried.append(f"download: {url} (not attempted, DISTILLER_OFFLINE is set)")
        raise FileNotFoundError(_not_found(relative, tried))
    try:
        _download(url, cached, relative)
    except (urllib.error.URLError, OSError) as err:
        tried.append(f"download: {url} failed ({type(err).__name__}: {err})")
        raise FileNotFoundError(_not_found(relative, tried)) from err
    return cached


def _not_found(relative: str, tried: list[str]) -> str:
    return f"FeNNol-PMC model file {relative} not found; looked up in order:\n  " + "\n  ".join(tried)


def _download(url: str, destination: pathlib.Path, relative: str) -> None:
    """Fetch url to destination atomically (temporary file in the same folder, checked, then renamed)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with replaced(destination) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        try:
            _verified(pathlib.Path(tmp), relative)
        except ChecksumError as err:
            raise ChecksumError(f"download of {url} rejected, nothing written to {destination}: {err}") from None
