"""Labelled structures on disk: a directory of ArrayRecord files, one manifest per labelling shard, metadata.

Layout of a dataset directory:

    metadata.json                           summary (written once the dataset is complete): format version,
                                            teacher, units, counts, elements, provenance, files and checksums
    manifest-00000-of-00002.json            one per labelling shard: the job that wrote it (teacher, sources,
                                            chunk size, shard count) and its committed parts, in commit order
    part-00000-of-00002-000003.arrayrecord  one per committed chunk of a shard; one record per structure
    rejected.json                           input structures left out by `distiller label --skip-bad`, with
                                            the reason for each (only when labelled with it)

A dataset is the union of the parts of all its manifests; several shards may write into one directory at the
same time (each owns its manifest and part names), so reading a directory merges its shards. Structures are
ordered by their index in the labelling job's input ("source index"), whatever the shard and chunk that
labelled them, so a sharded job and an unsharded one give the same dataset.

Records: b"DSR1" | crc32 of the payload (4 bytes, little-endian) | msgpack payload with numbers (uint8),
positions (float64), cell, pbc, energy, forces, stress, energy_spread, source index, name, `info` as JSON
(provenance) and, labelled with `--hvp K`, directions and hvp ((K, n, 3) float64 each: unit directions and the
teacher's H·v along them, eV/Å²; the job records K in its `hvp`; records without them, as every record written
before, read as None). ArrayRecord (Riegeli) hashes its own chunks too, but a file cut at a chunk boundary reads
as a shorter valid file, so every file's size, record count and sha256 are kept in the manifest: `open_dataset`
checks sizes and counts, every read checks the record's crc32, and `Dataset.verify` the sha256 of every file.
Any mismatch is a DatasetError naming the file (and the record).

Commits are atomic: a part is written under a temporary name, fsynced and renamed; then the manifest is
rewritten the same way with the part appended. A process killed at any moment leaves either the old manifest
(the part, if it was renamed already, is an orphan that the restarted job overwrites) or the new one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import zlib
from collections import Counter
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np
from ase.data import chemical_symbols

from distiller.files import is_temporary, replaced, sha256, write_json_atomic
from distiller.structure import Structure

FORMAT = "distiller-dataset"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å³ (ASE sign: (1/V) dE/dε)",
         "energy_spread": "eV", "hvp": "eV/Å² (H·v along unit directions)"}
MAGIC = b"DSR1"
# group_size:1 puts every record in its own Riegeli chunk, so one structure is read without decoding its
# neighbours (grain's random access); the reader options below turn off read-ahead for the same reason.
WRITER_OPTIONS = "group_size:1"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
METADATA = "metadata.json"
REJECTED = "rejected.json"
_MANIFEST = re.compile(r"^manifest-(\d{5})-of-(\d{5})\.json$")


class DatasetError(ValueError):
    """A dataset that cannot be read as it claims to be: corrupt, truncated, incomplete or inconsistent."""


# --------------------------------------------------------------------------------------------------
# Records


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return list(value)
    return repr(value)  # provenance must never stop a labelling job; keep what it says


def _array(value, dtype: str, shape: tuple[int, ...] | None = None) -> bytes:
    array = np.ascontiguousarray(np.asarray(value, dtype))
    if shape is not None and array.shape != shape:
        raise ValueError(f"expected shape {shape}, got {array.shape}")
    return array.tobytes()


def encode_structure(structure: Structure, source_index: int) -> bytes:
    """One record: the structure, its labels and provenance (`info`), framed with a crc32 of the payload.

    `info["energy_spread"]` (eV, set by labelling with an ensemble teacher) is stored as its own field.
    """
    s = structure
    n = s.n_atoms
    info = dict(s.info)
    spread = info.pop("energy_spread", None)
    payload = {
        "index": int(source_index),
        "name": s.name,
        "numbers": _array(s.numbers, "u1", (n,)),
        "positions": _array(s.positions, "<f8", (n, 3)),
        "cell": _array(s.cell, "<f8", (3, 3)),
        "pbc": [bool(p) for p in np.asarray(s.pbc).reshape(3)],
        "energy": None if s.energy is None else float(s.energy),
        "forces": None if s.forces is None else _array(s.forces, "<f8", (n, 3)),
        "stress": None if s.stress is None else _array(s.stress, "<f8", (3, 3)),
        "energy_spread": None if spread is None else float(spread),
        "info": json.dumps(info, default=_json_default, sort_keys=True),
        "directions": None if s.directions is None else _array(s.directions, "<f8", (len(s.directions), n, 3)),
        "hvp": None if s.hvp is None else _array(s.hvp, "<f8", (len(s.hvp), n, 3)),
    }
    body = msgpack.packb(payload, use_bin_type=True)
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def decode_structure(record: bytes, where: str = "record") -> tuple[Structure, int]:
    """(structure, source index) from one record; DatasetError naming `where` if it is damaged."""
    if len(record) < 8 or record[:4] != MAGIC:
        raise DatasetError(f"{where}: not a distiller structure record (bad header); the file is corrupt")
    (expected,) = struct.unpack("<I", record[4:8])
    body = record[8:]
    if zlib.crc32(body) != expected:
        raise DatasetError(f"{where}: checksum mismatch (crc32 {zlib.crc32(body):08x}, recorded {expected:08x}); "
                           f"the file is corrupt")
    try:
        p = msgpack.unpackb(body, raw=False)
        n = len(p["numbers"])
        numbers = np.frombuffer(p["numbers"], np.uint8).astype(np.int32)
        positions = np.frombuffer(p["positions"], "<f8").reshape(n, 3)
        cell = np.frombuffer(p["cell"], "<f8").reshape(3, 3)
        forces = None if p["forces"] is None else np.frombuffer(p["forces"], "<f8").reshape(n, 3)
        stress = None if p["stress"] is None else np.frombuffer(p["stress"], "<f8").reshape(3, 3)
        info = json.loads(p["info"])
        # Absent from records written before `--hvp` existed.
        directions, hvp = (None if p.get(key) is None else np.frombuffer(p[key], "<f8").reshape(-1, n, 3)
                           for key in ("directions", "hvp"))
        if p["energy_spread"] is not None:
            info["energy_spread"] = float(p["energy_spread"])
        structure = Structure(numbers=numbers, positions=positions, cell=cell, pbc=np.asarray(p["pbc"], bool),
                              name=p["name"], energy=p["energy"], forces=forces, stress=stress, info=info,
                              directions=directions, hvp=hvp)
        return structure, int(p["index"])
    except (KeyError, ValueError, TypeError, msgpack.UnpackException) as err:
        # The crc matched, so this is a record written by another format version or a bug, not noise.
        raise DatasetError(f"{where}: record does not decode ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------------------------------
# Files


def write_part(directory: str, name: str, records: Sequence[bytes]) -> dict:
    """Write records to `directory/name` atomically (temporary file, fsync, rename); its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with replaced(os.path.join(directory, name)) as tmp:
        writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        for record in records:
            writer.write(record)
        if not writer.ok():
            raise OSError(f"{tmp}: ArrayRecord writer failed")
        writer.close()
        entry = {"file": name, "records": len(records), "bytes": os.path.getsize(tmp), "sha256": sha256(tmp)}
    return entry


def manifest_name(shard: int, shards: int) -> str:
    return f"manifest-{shard:05d}-of-{shards:05d}.json"


def part_name(shard: int, shards: int, chunk: int) -> str:
    return f"part-{shard:05d}-of-{shards:05d}-{chunk:06d}.arrayrecord"


def hvp_directions(job: dict | None) -> int:
    """K for a labelling job run with `--hvp K` (each of its records holds K directions and the teacher's H·v
    along each); 0 for a job without."""
    return int(((job or {}).get("hvp") or {}).get("directions", 0))


def provenance_method(info: dict) -> str:
    """How a structure was made, from its provenance (`info["provenance"]["method"]`), else "input"."""
    provenance = info.get("provenance")
    if isinstance(provenance, dict) and provenance.get("method"):
        return str(provenance["method"])
    return "input"


# --------------------------------------------------------------------------------------------------
# Writing: one labelling shard


class ShardWriter:
    """The output of one shard of a labelling job: chunks committed atomically, listed in the shard's manifest.

    `job` identifies the job (teacher and the sha256 of its files, sources, chunk size, shard count...); this
    shard's manifest continues if it holds the same job, and any manifest of another job in the directory (this
    shard's or another's) is refused on opening, before any work. The manifest is written on opening, so a job
    started later beside this one sees it. One process per shard: a lock file (released by the kernel when the
    process dies, even by kill -9) enforces it.
    """

    def __init__(self, path: str | os.PathLike, job: dict, shard: int = 0, shards: int = 1):
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard}/{shards}: need 0 <= i < n")
        self.path = os.fspath(path)
        self.shard, self.shards = shard, shards
        self.job = json.loads(json.dumps(job, default=_json_default))  # as it will read back from disk
        os.makedirs(self.path, exist_ok=True)
        self._lock = open(os.path.join(self.path, f".{manifest_name(shard, shards)}.lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DatasetError(f"{self.path}: shard {shard}/{shards} is being written by another process") from None
        self.manifest_path = os.path.join(self.path, manifest_name(shard, shards))
        try:
            with _directory_lock(self.path):  # checked and claimed by one job at a time
                self._claim()
        except DatasetError:
            self.close()
            raise
        self._remove_leftovers()
        for part in self.manifest["parts"]:  # a resumed job builds on these: they must be whole
            file = os.path.join(self.path, part["file"])
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != part["bytes"]:
                self.close()
                raise DatasetError(f"{file}: committed by {self.manifest_path} with {part['bytes']} bytes, but it is "
                                   f"{'missing' if size is None else f'{size} bytes'}; delete this shard's manifest "
                                   f"and parts (or the directory) and label again")

    def _claim(self) -> None:
        """Continue this shard's manifest, or start it at once (so that a job started later beside it sees this
        one); refuse, before any work, a directory that holds shards of another job (another teacher or teacher
        file, other inputs, another shard count...): writing beside them would leave a dataset that no longer
        opens."""
        if os.path.exists(self.manifest_path):
            self.manifest = _read_json(self.manifest_path)
            if self.manifest.get("job") != self.job:
                raise DatasetError(_job_mismatch(self.manifest_path, self.manifest.get("job"), self.job))
        else:
            self.manifest = {"format": FORMAT, "version": FORMAT_VERSION, "job": self.job,
                             "shard": [self.shard, self.shards], "complete": False, "parts": [], "state": None}
        for name in sorted(os.listdir(self.path)):
            other = os.path.join(self.path, name)
            if _MANIFEST.match(name) and other != self.manifest_path:
                job = _read_json(other).get("job")
                if job != self.job:
                    raise DatasetError(_job_mismatch(other, job, self.job))
        if not os.path.exists(self.manifest_path):
            write_json_atomic(self.manifest_path, self.manifest, indent=None)

    def _remove_leftovers(self) -> None:
        """Temporary files of this shard from a killed process, and parts that never reached the manifest."""
        prefix = f"part-{self.shard:05d}-of-{self.shards:05d}-"
        committed = {p["file"] for p in self.manifest["parts"]}
        for name in os.listdir(self.path):
            stale_tmp = is_temporary(name) and name[1:].startswith((prefix, manifest_name(self.shard, self.shards)))
            orphan = name.startswith(prefix) and name not in committed
            if stale_tmp or orphan:
                os.remove(os.path.join(self.path, name))

    @property
    def committed_chunks(self) -> set[int]:
        return {p["chunk"] for p in self.manifest["parts"]}

    @property
    def state(self) -> bytes | None:
        """Opaque state saved with the last commit (e.g. a labeller's capacities), or None."""
        state = self.manifest.get("state")
        return None if state is None else base64.b64decode(state)

    def commit(self, chunk: int, structures: Sequence[Structure], indices: Sequence[int],
               state: bytes | None = None) -> None:
        """Write one chunk's structures as a part and append it to the manifest, atomically."""
        if chunk in self.committed_chunks:
            raise DatasetError(f"{self.manifest_path}: chunk {chunk} is already committed")
        if len(structures) != len(indices):
            raise ValueError(f"{len(structures)} structures but {len(indices)} indices")
        records = [encode_structure(s, k) for s, k in zip(structures, indices)]
        entry = write_part(self.path, part_name(self.shard, self.shards, chunk), records)
        entry.update(
            chunk=int(chunk), indices=[int(k) for k in indices], atoms=[s.n_atoms for s in structures],
            periodic=sum(s.periodic for s in structures), stress=sum(s.stress is not None for s in structures),
            spread=sum("energy_spread" in s.info for s in structures),
            elements=_element_counts(structures), methods=dict(Counter(provenance_method(s.info) for s in structures)),
        )
        manifest = {**self.manifest, "parts": self.manifest["parts"] + [entry]}
        if state is not None:
            # Pickled host state travels inside the manifest so that it changes in the same atomic rename.
            manifest["state"] = base64.b64encode(state).decode("ascii")
        write_json_atomic(self.manifest_path, manifest, indent=None)  # rewritten every commit: compact
        self.manifest = manifest

    def finish(self) -> bool:
        """Mark the shard complete; write metadata.json if that completes the dataset. True if it did."""
        expected = self.job.get("shard_sizes", [None] * self.shards)[self.shard]
        done = sum(p["records"] for p in self.manifest["parts"])
        if expected is not None and done != expected:
            raise DatasetError(f"{self.manifest_path}: {done} structures committed, the shard has {expected}")
        if not self.manifest["complete"]:
            self.manifest = {**self.manifest, "complete": True}
            write_json_atomic(self.manifest_path, self.manifest, indent=None)
        try:
            write_metadata(self.path)
            return True
        except IncompleteDataset:
            return False  # other shards still running; the last one to finish writes metadata.json

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def _directory_lock(path: str):
    """An exclusive lock on the directory itself (flock on its descriptor: no file to leave behind)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _element_counts(structures: Iterable[Structure]) -> dict[str, int]:
    counts: Counter = Counter()
    for s in structures:
        counts.update(chemical_symbols[int(z)] for z in np.asarray(s.numbers))
    return dict(sorted(counts.items()))


def _job_mismatch(path: str, old: Any, new: dict) -> str:
    keys = sorted(set(old or {}) | set(new))
    differ = [k for k in keys if (old or {}).get(k) != new.get(k)]
    return (f"{path} belongs to another labelling job (differs in: {', '.join(differ)}); restart with the same "
            f"command, or write to another --out directory")


def _hvp_held(job: dict) -> str:
    k = hvp_directions(job)
    return f"labelled with --hvp {k}" if k else "no Hessian-vector products"


def write_dataset(path: str | os.PathLike, structures: Sequence[Structure], teacher: str | None = None,
                  chunk: int = 1024, description: str = "") -> "Dataset":
    """Write (labelled) structures as a complete one-shard dataset in one go; returns it opened."""
    structures = list(structures)
    digest = hashlib.sha256()
    records = [encode_structure(s, k) for k, s in enumerate(structures)]
    for r in records:
        digest.update(r)
    job = {"teacher": teacher, "sources": [{"path": description or "<in memory>", "sha256": digest.hexdigest(),
                                            "structures": len(structures)}],
           "structures": len(structures), "chunk": chunk, "shards": 1, "shard_sizes": [len(structures)]}
    products = {None if s.hvp is None else len(s.hvp) for s in structures}
    if len(products) == 1 and None not in products:  # the job says what its records hold, as labelling's does
        job["hvp"] = {"directions": products.pop()}
    with ShardWriter(path, job) as writer:
        for c, start in enumerate(range(0, len(structures), chunk)):
            if c not in writer.committed_chunks:
                part = structures[start:start + chunk]
                writer.commit(c, part, range(start, start + len(part)))
        writer.finish()
    return open_dataset(path)


# --------------------------------------------------------------------------------------------------
# Reading


class IncompleteDataset(DatasetError):
    """Shards are missing or unfinished."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def read_manifests(path: str) -> list[dict]:
    """All shard manifests of a dataset directory, checked to come from one job; sorted by shard."""
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: no such dataset directory")
    manifests = []
    for name in sorted(os.listdir(path)):
        m = _MANIFEST.match(name)
        if not m:
            continue
        manifest = _read_json(os.path.join(path, name))
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{path}/{name}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                               f"this reader knows {FORMAT!r} version {FORMAT_VERSION}")
        if manifest.get("shard") != [int(m.group(1)), int(m.group(2))]:
            raise DatasetError(f"{path}/{name}: says it is shard {manifest.get('shard')}")
        manifest["_file"] = name
        manifests.append(manifest)
    if not manifests:
        raise DatasetError(f"{path}: not a dataset (no manifest-*.json)")
    first = manifests[0]
    for other in manifests[1:]:
        if other["job"] != first["job"]:
            raise DatasetError(_job_mismatch(f"{path}/{other['_file']}", first["job"], other["job"])
                               .replace("belongs to another labelling job", f"and {first['_file']} come from different jobs"))
    return manifests


def _completeness(path: str, manifests: list[dict]) -> list[str]:
    """What is missing for the dataset to be complete (empty list: complete)."""
    shards = manifests[0]["shard"][1]
    have = {m["shard"][0]: m for m in manifests}
    problems = [f"shard {i}/{shards} missing" for i in range(shards) if i not in have]
    problems += [f"shard {i}/{shards} unfinished ({sum(p['records'] for p in m['parts'])} structures so far)"
                 for i, m in sorted(have.items()) if not m["complete"]]
    return problems


def summarise(path: str, manifests: list[dict]) -> dict:
    """metadata.json's content for a complete dataset."""
    parts = [p for m in manifests for p in m["parts"]]
    job = manifests[0]["job"]
    elements: Counter = Counter()
    methods: Counter = Counter()
    for p in parts:
        elements.update(p["elements"])
        methods.update(p["methods"])
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "teacher": job.get("teacher"), "teacher_files": job.get("teacher_files"), "units": UNITS,
        "structures": sum(p["records"] for p in parts), "atoms": sum(sum(p["atoms"]) for p in parts),
        "periodic": sum(p["periodic"] for p in parts), "with_stress": sum(p["stress"] for p in parts),
        "with_energy_spread": sum(p["spread"] for p in parts), "rejected": job.get("rejected", 0),
        "hvp_directions": hvp_directions(job),
        "elements": dict(sorted(elements.items())),
        "provenance": {"sources": job.get("sources"), "methods": dict(sorted(methods.items()))},
        "shards": manifests[0]["shard"][1], "chunk": job.get("chunk"),
        "files": [{k: p[k] for k in ("file", "records", "bytes", "sha256")} for p in parts],
    }


def write_metadata(path: str) -> dict:
    """Write metadata.json for a complete dataset (raises IncompleteDataset otherwise). Several shards may
    finish at once and each write it: the content is a function of the manifests, so they agree."""
    manifests = read_manifests(path)
    missing = _completeness(path, manifests)
    if missing:
        raise IncompleteDataset(f"{path}: incomplete: " + "; ".join(missing))
    metadata = summarise(path, manifests)
    metadata["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(os.path.join(path, METADATA), metadata)
    return metadata


@dataclasses.dataclass(frozen=True)
class _Part:
    file: str  # path
    records: int
    bytes: int
    sha256: str


class Dataset:
    """Random access to the structures of a dataset directory, in source-index order.

    `dataset[k]` is a labelled Structure (`info["energy_spread"]` when the teacher had an ensemble);
    `dataset.get(ks)` reads several, one ArrayRecord call per file. `n_atoms` and `source_indices` are
    known without reading records. Readers are opened lazily, one per thread, so a Dataset can be shared
    by grain's threads and pickled to its worker processes.
    """

    def __init__(self, path: str, manifests: list[dict], metadata: dict):
        self.path = path
        self.metadata = metadata
        self.job = manifests[0]["job"]
        self.parts: list[_Part] = []
        part_of, record_of, indices, atoms = [], [], [], []
        for m in manifests:
            for entry in m["parts"]:
                k = len(self.parts)
                self.parts.append(_Part(os.path.join(path, entry["file"]), entry["records"], entry["bytes"],
                                        entry["sha256"]))
                if not (len(entry["indices"]) == len(entry["atoms"]) == entry["records"]):
                    raise DatasetError(f"{path}/{m['_file']}: entry for {entry['file']} is inconsistent")
                part_of += [k] * entry["records"]
                record_of += list(range(entry["records"]))
                indices += entry["indices"]
                atoms += entry["atoms"]
        order = np.argsort(np.asarray(indices, np.int64), kind="stable")
        self.source_indices = np.asarray(indices, np.int64)[order]
        duplicated = np.flatnonzero(np.diff(self.source_indices) == 0)
        if duplicated.size:
            k = self.source_indices[duplicated[0]]
            files = [self.parts[part_of[j]].file for j in np.flatnonzero(np.asarray(indices) == k)]
            raise DatasetError(f"{path}: structure {k} appears more than once (in {', '.join(files)})")
        self._part = np.asarray(part_of, np.int64)[order]
        self._record = np.asarray(record_of, np.int64)[order]
        self.n_atoms = np.asarray(atoms, np.int64)[order]
        self._local = threading.local()
        self._check_files()

    # -- checks ---------------------------------------------------------------------------------------
    def _check_files(self) -> None:
        for part in self.parts:
            if not os.path.isfile(part.file):
                raise DatasetError(f"{part.file}: missing (listed in the manifest with {part.records} structures)")
            size = os.path.getsize(part.file)
            if size != part.bytes:
                raise DatasetError(f"{part.file}: {size} bytes, the manifest records {part.bytes}: the file is "
                                   f"truncated or was modified")

    def verify(self) -> None:
        """Check every file's sha256 and decode every record (reads the whole dataset)."""
        for part in self.parts:
            digest = sha256(part.file)
            if digest != part.sha256:
                raise DatasetError(f"{part.file}: sha256 {digest} differs from the recorded {part.sha256}: corrupt")
        for k in range(0, len(self), 4096):
            self.get(range(k, min(k + 4096, len(self))))

    # -- access -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._part.shape[0])

    def _reader(self, p: int):
        from array_record.python.array_record_module import ArrayRecordReader

        readers = self._local.__dict__.setdefault("readers", {})
        if p not in readers:
            part = self.parts[p]
            try:
                reader = ArrayRecordReader(part.file, READER_OPTIONS)
            except Exception as err:  # riegeli raises RuntimeError/ValueError for damaged footers
                raise DatasetError(f"{part.file}: cannot be opened as ArrayRecord ({err}); the file is corrupt") from err
            if reader.num_records() != part.records:
                raise DatasetError(f"{part.file}: holds {reader.num_records()} records, the manifest records "
                                   f"{part.records}: the file is truncated or was modified")
            readers[p] = reader
        return readers[p]

    def _read(self, p: int, records: list[int]) -> list[bytes]:
        try:
            return self._reader(p).read(records)
        except DatasetError:
            raise
        except Exception as err:
            # Riegeli checks its chunk hashes; name the records asked for (one, when reading one by one).
            where = f"record {records[0]}" if len(records) == 1 else f"records {records[0]}..{records[-1]}"
            raise DatasetError(f"{self.parts[p].file}: {where} unreadable ({err}); the file is corrupt") from err

    def __getitem__(self, k: int) -> Structure:
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"structure {k} of a dataset of {len(self)}")
        return self.get([k % len(self)])[0]

    def get(self, ks: Iterable[int]) -> list[Structure]:
        """Structures at dataset positions `ks`, in that order."""
        ks = np.asarray(list(ks), np.int64)
        out: list[Structure | None] = [None] * len(ks)
        parts = self._part[ks]
        for p in np.unique(parts):
            where = np.flatnonzero(parts == p)
            records = self._record[ks[where]].tolist()
            for j, r, blob in zip(where, records, self._read(int(p), records)):
                structure, index = decode_structure(blob, f"{self.parts[p].file}: record {r}")
                if index != self.source_indices[ks[j]]:
                    raise DatasetError(f"{self.parts[p].file}: record {r} is structure {index}, the manifest says "
                                       f"{self.source_indices[ks[j]]}")
                out[j] = structure
        return out  # type: ignore[return-value]

    def __iter__(self):
        for k in range(0, len(self), 256):
            yield from self.get(range(k, min(k + 256, len(self))))

    @property
    def files(self) -> list[str]:
        return [p.file for p in self.parts]

    @property
    def teacher(self) -> str | None:
        return self.job.get("teacher")

    @property
    def hvp_directions(self) -> int:
        """K: every structure holds K directions and the teacher's H·v along each (`distiller label --hvp K`); 0:
        none."""
        return hvp_directions(self.job)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")  # readers are per process and thread
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Dataset({self.path!r}, {len(self)} structures, teacher={self.teacher!r}, {len(self.parts)} files)"


class PooledDataset:
    """Datasets read as one, in order (the `Dataset` reading interface the loader uses: len, n_atoms, get, path and
    teacher, the last two the first's): indices 0..N-1 are the first's, then the next one's, and so on."""

    def __init__(self, base: Dataset, extra: Sequence[Dataset]):
        self.parts = [base, *extra]
        self.path, self.teacher = base.path, base.teacher
        self.n_atoms = np.concatenate([np.asarray(d.n_atoms) for d in self.parts])
        self._offsets = np.cumsum([0] + [len(d) for d in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get(self, ks) -> list[Structure]:
        ks = np.asarray(list(ks), np.int64)
        which = np.searchsorted(self._offsets, ks, side="right") - 1
        out: list[Any] = [None] * len(ks)
        for p in np.unique(which):
            where = np.flatnonzero(which == p)
            for j, s in zip(where, self.parts[p].get((ks[where] - self._offsets[p]).tolist())):
                out[j] = s
        return out

    def __getitem__(self, k: int) -> Structure:
        return self.get([k])[0]


def open_dataset(path: str | os.PathLike, allow_incomplete: bool = False) -> Dataset:
    """Open a dataset directory, merging its shards; checks manifests, metadata.json and file sizes.

    An incomplete dataset (shards missing or still labelling) is an error unless `allow_incomplete`, which
    gives what has been committed so far.
    """
    path = os.fspath(path)
    manifests = read_manifests(path)
    missing = _completeness(path, manifests)
    if missing and not allow_incomplete:
        raise IncompleteDataset(f"{path}: incomplete dataset: {'; '.join(missing)} (finish or restart the labelling "
                                f"jobs, or merge the directories that hold the other shards)")
    summary = summarise(path, manifests)
    metadata_path = os.path.join(path, METADATA)
    metadata = summary  # without metadata.json (shards copied together by hand) the manifests say everything
    if os.path.exists(metadata_path) and not missing:
        metadata = _read_json(metadata_path)
        if metadata.get("files") != summary["files"]:
            raise DatasetError(f"{metadata_path}: its file list and checksums disagree with the manifests")
    expected = manifests[0]["job"].get("structures")
    dataset = Dataset(path, manifests, metadata)
    if not missing and expected is not None and len(dataset) != expected:
        raise DatasetError(f"{path}: {len(dataset)} structures, the labelling job had {expected}")
    return dataset


def is_dataset(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and any(_MANIFEST.match(n) for n in os.listdir(path))


def merge_datasets(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Dataset:
    """Gather the shards held by several directories (of one labelling job) into `out`; returns it opened.

    Every input's manifests must come from the same job, no shard may appear twice, and together they
    must make the dataset complete. Part files are copied (checked against their sha256) unless `out` is
    the directory they are in.
    """
    out = os.fspath(out)
    found: dict[int, tuple[str, dict]] = {}
    job = first = None
    for directory in map(os.fspath, inputs):
        for manifest in read_manifests(directory):
            if job is None:
                job, first = manifest["job"], directory
            elif hvp_directions(manifest["job"]) != hvp_directions(job):
                raise DatasetError(f"cannot merge {first} ({_hvp_held(job)}) with {directory} "
                                   f"({_hvp_held(manifest['job'])}): label every shard with the same --hvp")
            elif manifest["job"] != job:
                raise DatasetError(_job_mismatch(f"{directory}/{manifest['_file']}", job, manifest["job"]))
            shard = manifest["shard"][0]
            if shard in found and os.path.realpath(found[shard][0]) != os.path.realpath(directory):
                raise DatasetError(f"shard {manifest['shard']} is in both {found[shard][0]} and {directory}")
            found[shard] = (directory, manifest)
    manifests = [m for _, (_, m) in sorted(found.items())]
    missing = _completeness(out, manifests)
    if missing:
        raise IncompleteDataset(f"cannot merge {', '.join(map(os.fspath, inputs))}: " + "; ".join(missing))
    if is_dataset(out):  # never copy another job's shards beside these: neither would open any more
        for manifest in read_manifests(out):
            if manifest["job"] != job:
                raise DatasetError(_job_mismatch(f"{out}/{manifest['_file']}", manifest["job"], job))
    os.makedirs(out, exist_ok=True)
    for _, (directory, manifest) in sorted(found.items()):
        if os.path.realpath(directory) == os.path.realpath(out):
            continue
        for part in manifest["parts"]:
            source, destination = os.path.join(directory, part["file"]), os.path.join(out, part["file"])
            with replaced(destination) as tmp:
                shutil.copyfile(source, tmp)
                if sha256(tmp) != part["sha256"]:
                    raise DatasetError(f"{source}: sha256 differs from its manifest's record: corrupt, not merged")
        manifest = {k: v for k, v in manifest.items() if k != "_file"}
        write_json_atomic(os.path.join(out, manifest_name(*manifest["shard"])), manifest, indent=None)
    # Every shard of a job lists the same rejected structures (the whole input is screened); one copy travels.
    listed = [d for d in map(os.fspath, inputs) if os.path.isfile(os.path.join(d, REJECTED))]
    if listed and os.path.realpath(listed[0]) != os.path.realpath(out):
        with replaced(os.path.join(out, REJECTED)) as tmp:
            shutil.copyfile(os.path.join(listed[0], REJECTED), tmp)
    write_metadata(out)
    return open_dataset(out)
