"""The training and held-out corpus: phantoms of three kinds plus real CTs.

* ``covid``: a phantom with COVID-19 lesions (label 1) covering 0.1-60 % of the lungs,
  sometimes with another finding too.
* ``normal``: a phantom without disease (label 0), often with the dependent atelectasis of a
  supine patient.
* ``other``: a phantom with one to three non-COVID findings (label 0, empty lesion mask):
  nodules, masses, emphysema, fibrosis, effusion, atelectasis, lobar consolidation, metal.
* real CTs (:mod:`dcn_train.real_ct`): as they are (label 0: lung cancers), with
  other findings added, and with COVID-19 lesions inserted into their real parenchyma
  (label 1; the inserted mask is the truth). Their lung truth is the classical lung mask.

Splits are by seed range and by patient: :data:`TRAIN_SEED_BASE` for training,
:data:`VALIDATION_SEED_BASE` for calibration and threshold, evaluation seeds (900000+) for
held-out figures; real patients by :attr:`RealCase.split`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcn_train.findings import Geometry, add_other_disease, insert_covid_lesions

LOGGER = logging.getLogger(__name__)

#: Seeds of training phantoms, of validation phantoms (calibration), of held-out ones.
TRAIN_SEED_BASE = 10_000
VALIDATION_SEED_BASE = 500_000
HELDOUT_SEED_BASE = 900_000
#: Phantom kinds in the order seeds cycle through them (half COVID-19, a quarter each
#: normal and other disease).
KIND_CYCLE = ("covid", "normal", "covid", "other")
THICKNESS_CYCLE = (5.0, 1.25, 3.0, 2.0)
#: Bumped whenever what a case holds changes, so caches are never reused wrongly.
#: 5: COVID-19 phantoms cover at least MIN_INVOLVEMENT of the lungs (4 was the real scans
#: with their tumour as lung, taken out again; its caches must not be read as 5).
CORPUS_VERSION = "5"
#: The least share of the lungs a COVID-19 phantom's lesions cover (issue 15: COVID-19
#: patterns from 0.1 % to 60 % involvement).
MIN_INVOLVEMENT = 0.001


@dataclass
class CaseVolume:
    """One case in HU with its truth, before caching at the network's size."""

    name: str
    hu: np.ndarray  # float32 (slices, rows, columns)
    lung: np.ndarray
    lesion: np.ndarray
    label: int
    pixel_spacing_mm: float
    slice_spacing_mm: float
    kind: str
    findings: tuple[str, ...] = ()


def _noise_sd(hu: np.ndarray, lung: np.ndarray) -> float:
    from scipy import ndimage

    slices = np.flatnonzero(lung.any((1, 2)))
    if not len(slices):
        return 20.0
    k = slices[len(slices) // 2]
    high = hu[k] - ndimage.uniform_filter(hu[k], 3)
    return float(np.clip(np.std(high[lung[k]]) * 1.2, 5, 80))


def _renoise(rng: np.random.Generator, before: np.ndarray, after: np.ndarray, sd: float
             ) -> None:
    """Painted voxels get the scan's noise back (painting replaced it)."""
    changed = np.abs(after - before) > 1
    after[changed] += rng.normal(0, sd, int(changed.sum())).astype(np.float32)


def phantom_case(seed: int, kind: str, thickness_mm: float) -> CaseVolume:
    """A phantom of ``kind`` (covid, normal, other) from ``seed``."""
    from dcn_train.phantom import generate_volume

    volume = generate_volume(seed, thickness_mm=thickness_mm, normal=kind != "covid")
    rng = np.random.default_rng([seed, 77])
    hu = volume.hu.astype(np.float32)
    geo = Geometry(volume.pixel_spacing_mm, volume.slice_thickness_mm)
    lung = volume.lung
    sd = _noise_sd(hu, lung)
    before = hu.copy()
    findings: list[str] = []
    if kind == "other":
        lung, findings = add_other_disease(rng, hu, lung, None, geo)
    elif rng.random() < (0.5 if kind == "normal" else 0.3):
        lung, findings = add_other_disease(rng, hu, lung, None, geo, ("atelectasis",))
    if kind == "covid" and rng.random() < 0.2:
        lung, more = add_other_disease(rng, hu, lung, None, geo)
        findings += more
    _renoise(rng, before, hu, sd)
    lesion = volume.lesion & lung
    if kind == "covid":
        lesion = _at_least_minimum_involvement(rng, hu, lung, lesion, geo, sd)
    label = int(lesion.any()) if kind == "covid" else 0
    return CaseVolume(f"phantom-{seed}-{kind}", hu, lung, lesion, label,
                      volume.pixel_spacing_mm, volume.slice_thickness_mm, kind, tuple(findings))


def _at_least_minimum_involvement(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray,
                                  lesion: np.ndarray, geo: Geometry, noise_sd: float
                                  ) -> np.ndarray:
    """``lesion`` grown to at least :data:`MIN_INVOLVEMENT` of ``lung`` (``hu`` painted in
    place). The generator's mildest cases (1-3 lesions of 2.5-6 mm radius) can end as a few
    voxels, 0.001-0.09 % of the lungs after partial volume at 5 mm: a COVID-19 label on an
    image no reader could call, which taught the networks noise and made a third of the
    corpus v3 positives unrankable. Below the floor, lesions are inserted up to a share
    drawn log-uniformly from the floor to ten times it; above it nothing changes (no random
    draw either, so those cases stay as corpus v3 made them)."""
    lung_voxels = int(lung.sum())
    covered = int(lesion.sum())
    if not lung_voxels or covered >= MIN_INVOLVEMENT * lung_voxels:
        return lesion
    target = math.exp(rng.uniform(math.log(MIN_INVOLVEMENT), math.log(10 * MIN_INVOLVEMENT)))
    free = lung & ~lesion  # new lesions beside the old ones, never painted over them
    share_of_free = (target * lung_voxels - covered) / max(int(free.sum()), 1)
    added = insert_covid_lesions(rng, hu, free, geo, involvement=share_of_free,
                                 noise_sd=noise_sd)
    return lesion | added


def phantom_seed(base: int, index: int) -> tuple[int, str, float]:
    """(seed, kind, thickness) of the ``index``-th phantom from seed ``base`` on."""
    return (base + index, KIND_CYCLE[index % len(KIND_CYCLE)],
            THICKNESS_CYCLE[(index // len(KIND_CYCLE)) % len(THICKNESS_CYCLE)])


def phantom_seeds(base: int, count: int) -> Iterator[tuple[int, str, float]]:
    """(seed, kind, thickness) of ``count`` phantoms from seed ``base`` on."""
    return (phantom_seed(base, index) for index in range(count))


def real_variants(case: object, variants: int, seed: int) -> Iterator[CaseVolume]:
    """A real CT as it is, then ``variants`` times with inserted COVID-19 lesions and, every
    other time, with other findings added (a negative)."""
    from dcn_node.inference.anatomy import classical_anatomy
    from dcn_node.volume import load_dicom_folder

    volume = load_dicom_folder(case.series_dir)  # type: ignore[attr-defined]
    name = case.name  # type: ignore[attr-defined]
    spacing, slice_spacing = float(volume.pixel_spacing[1]), volume.slice_spacing_mm
    anatomy = classical_anatomy(volume.hu, spacing, slice_spacing)
    geo = Geometry(spacing, slice_spacing)
    base = volume.hu.astype(np.float32)
    sd = _noise_sd(base, anatomy.lung)
    empty = np.zeros(base.shape, bool)
    yield CaseVolume(f"real-{name}", base.copy(), anatomy.lung, empty, 0, spacing,
                     slice_spacing, "real")
    for variant in range(variants):
        rng = np.random.default_rng([seed, variant, 91])
        hu = base.copy()
        lesion = insert_covid_lesions(rng, hu, anatomy.lung, geo, noise_sd=sd)
        yield CaseVolume(f"real-{name}-covid{variant}", hu, anatomy.lung, lesion,
                         int(lesion.any()), spacing, slice_spacing, "real-covid")
        if variant % 2 == 0:
            hu = base.copy()
            lung, findings = add_other_disease(rng, hu, anatomy.lung, anatomy.body, geo)
            _renoise(rng, base, hu, sd)
            yield CaseVolume(f"real-{name}-other{variant}", hu, lung, empty, 0, spacing,
                             slice_spacing, "real-other", tuple(findings))


def cache_cases(cases: Iterable[tuple[str, Callable[[], CaseVolume]]], cache_dir: Path,
                size: int) -> list[Path]:
    """Cache each case at the network size as ``<name>-c<version>-<size>.npz``; ``cases``
    are (name, factory) pairs and a factory runs only for a case not cached yet."""
    from dcn_train.cases import make_case

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, factory in cases:
        path = cache_dir / f"{name}-c{CORPUS_VERSION}-{size}.npz"
        if not path.exists():
            volume = factory()
            partial = path.with_name(path.stem + ".partial.npz")
            make_case(path.stem, volume.hu, volume.lung, volume.lesion, volume.label, size,
                      pixel_spacing_mm=volume.pixel_spacing_mm).save(partial)
            partial.replace(path)  # a killed run never leaves half a case behind
            LOGGER.info("case %s: %d slices, label %d, %s", volume.name, len(volume.hu),
                        volume.label, ", ".join(volume.findings) or "-")
        paths.append(path)
    return paths


def training_corpus(cache_dir: Path, size: int, phantoms: int, real_cache: Path | None,
                    real_variants_per_case: int = 6, seed_base: int | None = None
                    ) -> list[Path]:
    """Training cases: ``phantoms`` phantoms from ``seed_base`` (default
    :data:`TRAIN_SEED_BASE`) and the real CTs of the training split, with variants. Cases
    already cached are not made again."""
    first = TRAIN_SEED_BASE if seed_base is None else seed_base
    cases: list[tuple[str, Callable[[], CaseVolume]]] = [
        (f"phantom-{seed}-{kind}", functools.partial(phantom_case, seed, kind, thickness))
        for seed, kind, thickness in phantom_seeds(first, phantoms)]
    if real_cache is not None:
        from dcn_train.real_ct import real_cases

        @functools.lru_cache(maxsize=1)  # one scan's variants at a time, each made once
        def variants_of(index: int, case: object) -> dict[str, CaseVolume]:
            return {v.name: v for v in real_variants(case, real_variants_per_case,
                                                     4242 + index)}

        def variant_of(index: int, case: object, name: str) -> CaseVolume:
            return variants_of(index, case)[name]

        for index, case in enumerate(real_cases(real_cache)):
            if case.split == "train" and case.region == "chest":
                for variant in real_variant_names(case.name, real_variants_per_case):
                    cases.append((variant, functools.partial(variant_of, index, case, variant)))
    return cache_cases(cases, cache_dir, size)


def real_variant_names(name: str, variants: int) -> list[str]:
    """The names :func:`real_variants` gives its cases, in its order."""
    names = [f"real-{name}"]
    for variant in range(variants):
        names.append(f"real-{name}-covid{variant}")
        if variant % 2 == 0:
            names.append(f"real-{name}-other{variant}")
    return names

