"""Node configuration: YAML -> validated, frozen settings.

The whole file is checked at once and every problem is reported with its key path
(``node.port: Input should be less than or equal to 65535``), so an administrator fixes
a config in one pass instead of one error per restart.

Relative paths (``storage.spool_dir``) are resolved against the working directory of the
process that loads the file: ``make run`` runs from the project root, the systemd unit sets
``WorkingDirectory``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcn_node.errors import ConfigError

#: The configuration shipped with the project and used by ``make run``.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "dcn-node.yaml"

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Frozen):
    """The Storage SCP: who we are and who may talk to us."""

    ae_title: AETitle = "DCN_NODE"
    host: str = "0.0.0.0"
    #: 0 picks a free port (used by tests); the port in use is logged at start.
    port: Annotated[int, Field(ge=0, le=65535)] = 11112
    #: Calling AE titles allowed to associate; empty means anyone.
    allowed_calling_aets: tuple[AETitle, ...] = ()
    #: Peer IP addresses allowed to associate; empty means any host.
    allowed_hosts: tuple[str, ...] = ()
    #: Associations served at once (the issue asks for at least 8).
    max_associations: Annotated[int, Field(ge=1, le=256)] = 16
    #: Largest P-DATA PDU we accept; 0 means no limit. Large PDUs cut per-PDU overhead.
    maximum_pdu_size: Annotated[int, Field(ge=0)] = 0
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    #: Faster pynetdicom transport: short polling sleeps while busy, bulk socket reads
    #: (see dcn_node/transport_tuning.py).
    transport_tuning: bool = True


class StorageSettings(_Frozen):
    """The durable spool: received files and the SQLite index."""

    spool_dir: Path = Path("var/spool")
    #: fsync each file (and the SQLite commit) before answering Success. Off: an
    #: acknowledged instance survives a crash of the node (kill -9); on: it also survives
    #: a power loss or kernel crash, at ~2 ms per instance on the disks measured.
    fsync: bool = False
    #: Below this many free bytes in the spool, C-STOREs are answered "out of resources".
    min_free_bytes: Annotated[int, Field(ge=0)] = 1_000_000_000


class CompletionSettings(_Frozen):
    """When a series counts as complete, and what a valid series looks like."""

    #: A series is complete when no instance arrived for this long.
    quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: How often the completion job looks at open series.
    check_interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    #: Fewer slices than this: rejected (a chest CT has dozens at least).
    min_slices: Annotated[int, Field(ge=1)] = 20
    #: A gap larger than this factor times the typical slice spacing: rejected.
    max_gap_factor: Annotated[float, Field(gt=1.0)] = 1.5
    #: Slices closer than this along the normal are duplicates.
    duplicate_tolerance_mm: Annotated[float, Field(gt=0)] = 0.01
    #: Orientation row/column cosines must be within this of axial (|n_z| >= 1 - tol).
    axial_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.05


class ThicknessRange(_Frozen):
    min: Annotated[float, Field(gt=0)] = 0.5
    max: Annotated[float, Field(gt=0)] = 10.0

    @model_validator(mode="after")
    def _ordered(self) -> ThicknessRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class SelectionSettings(_Frozen):
    """Which valid series are queued for the model, so a PACS routing too much does not
    flood it. A valid series not selected becomes ``ignored`` with the rule that failed."""

    #: BodyPartExamined values accepted (case-insensitive); empty means any.
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN")
    #: Accept a series without BodyPartExamined (many scanners leave it empty).
    allow_missing_body_part: bool = True
    #: If set, SeriesDescription must match this regular expression (search, any case).
    series_description_include: str | None = None
    #: SeriesDescription matching this regular expression is not selected.
    series_description_exclude: str | None = r"\b(mip|minip|mpr|scout|topogram|localizer|dose)\b"
    slice_thickness_mm: ThicknessRange = ThicknessRange()

    @field_validator("series_description_include", "series_description_exclude")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class Destination(_Frozen):
    """A peer that receives the results (used by the sender)."""

    name: Annotated[str, Field(min_length=1)]
    ae_title: AETitle
    host: str
    port: Port
    kinds: tuple[Literal["seg", "sc", "sr"], ...] = ("seg", "sc", "sr")


class InferenceSettings(_Frozen):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    profile: Literal["lite", "paper"] = "lite"
    #: Folder with the weights and their manifest; default: the shipped models/.
    models_dir: Path | None = None
    #: Run queued series through the model (off: receive and queue only).
    enabled: bool = True


class MetricsSettings(_Frozen):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["human", "json"] = "human"


class Settings(_Frozen):
    """The whole node configuration."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    selection: SelectionSettings = SelectionSettings()
    destinations: tuple[Destination, ...] = ()
    inference: InferenceSettings = InferenceSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return value


def _format_errors(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{path}: {item['msg']}")
    return lines


def parse_settings(data: Any, source: str = "<config>") -> Settings:
    """Validate a mapping (as read from YAML) into :class:`Settings`.

    Raises
    ------
    ConfigError
        Listing every problem found, each with its key path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None


def load_config(path: Path | str | None = None) -> Settings:
    """Read and validate a YAML config file (the shipped default when ``path`` is None).

    Raises
    ------
    ConfigError
        If the file cannot be read, is not YAML, or holds invalid settings.
    """
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(config_path), [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(config_path), [f"not valid YAML: {exc}"]) from None
    return parse_settings(data, str(config_path))
