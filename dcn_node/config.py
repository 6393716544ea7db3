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
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcn_node.errors import ConfigError


def package_path(name: str) -> Path:
    """A file or folder shipped inside the package (package data), as a file-system path.

    Found through :mod:`importlib.resources`, so it is the installed copy wherever the
    package lives (a wheel in site-packages, or the checkout of an editable install).

    Raises
    ------
    RuntimeError
        If the package is not installed as files (e.g. imported from a zip): the weights are
        read with ``torch.load`` and the config by path.
    """
    path = resources.files("dcn_node") / name
    if not isinstance(path, Path):
        raise RuntimeError(f"dcn_node is not installed as files: cannot use {path}")
    return path


#: The configuration shipped in the package (``dcn_node/dcn-node.yaml``), used by
#: ``make run`` and by every command without ``--config``.
DEFAULT_CONFIG_PATH = package_path("dcn-node.yaml")

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScpTlsSettings(_Frozen):
    """DICOM over TLS for the Storage SCP (TLS 1.2 or newer only)."""

    #: Our certificate (PEM, with its chain) and its private key.
    cert_file: Path
    key_file: Path
    #: CA bundle that signs the certificates of peers allowed in (mutual TLS).
    ca_file: Path | None = None
    #: Refuse peers without a certificate signed by ``ca_file``.
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _ca_for_client_certs(self) -> ScpTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA of allowed peers)")
        return self


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
    #: Largest dataset one C-STORE may carry; a larger one is cut off while it arrives
    #: (the association is aborted) or answered 0xC000. Bounds memory per association.
    max_dataset_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    #: DICOM over TLS (off when absent): the port then speaks TLS only.
    tls: ScpTlsSettings | None = None
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    #: On SIGTERM: in-flight C-STOREs, the model run and deliveries get this long to end.
    shutdown_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: This node's name on the claims it holds in a shared store (None: host name and
    #: process id). A node restarted under the same id takes back its own claims at once.
    id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    #: pynetdicom transport tuning (dcn_node/net/transport_tuning.py): event-driven waits
    #: instead of 1 ms polling sleeps, and C-STORE responses encoded directly. Bulk socket
    #: reads (which carry the PDU size limit) are always on.
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
    #: Instances refused for their content are kept in ``<spool_dir>/quarantine/`` up to
    #: this many bytes in all (then logged and not kept); 0 = no quarantine.
    quarantine_max_bytes: Annotated[int, Field(ge=0)] = 1 << 30


class StoreSettings(_Frozen):
    """Where the index (series, jobs, outbox, dead letters) is kept."""

    #: None: ``index.sqlite3`` in ``storage.spool_dir`` (one node). A PostgreSQL URL
    #: (``postgresql://user@host:5432/dcn`` or libpq's ``?host=/socket/dir``): the same
    #: tables in that database, shared by the nodes of a cluster (needs the ``cluster``
    #: extra, psycopg). Received files and results stay in the spool folder either way.
    url: str | None = None
    #: How long a node's claim on a job or a delivery holds without being renewed (the
    #: holder renews it every third of this while it works). With PostgreSQL only: a
    #: node that stops renewing (crashed, cut off) leaves its work to the others after
    #: this long. SQLite's index is one node's: its claims hold until the node restarts.
    lease_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("url")
    @classmethod
    def _postgresql_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or unset for SQLite in the spool)")
        return value


class BrokerSettings(_Frozen):
    """The message broker that hands inference jobs to ``dcn-node worker`` processes
    (Celery on RabbitMQ, cluster mode; docs/workers.md)."""

    #: None: no broker; a node runs the model on its own worker thread (``serve``). An
    #: AMQP URL (``amqp://user@rabbit.example:5672/vhost``): the node that completes a
    #: series publishes one task per job to ``queue``, and ``dcn-node worker`` processes
    #: run them. Needs ``store.url`` (the workers record results in the shared store) and
    #: the ``cluster`` extra (celery).
    url: str | None = None
    #: The RabbitMQ quorum queue the jobs go to (``dcn-node worker --queue`` default).
    queue: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")] = (
        "dcn-inference"
    )
    #: How often a receiving node publishes again the jobs the store holds as queued and
    #: unclaimed, or whose claim's lease ran out (a publish lost when the node died between
    #: recording the job and publishing it, the broker down, a worker killed): duplicates
    #: are harmless, the store's claim fences them.
    republish_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: A job still queued this long after this node last published it is published again
    #: (a message lost in a way nothing else noticed); 0: never.
    republish_after_seconds: Annotated[float, Field(ge=0)] = 600.0
    #: Connecting to the broker (publishing, and the /readyz broker check) gives up after
    #: this long.
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 3.0

    @field_validator("url")
    @classmethod
    def _amqp_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must be an amqp:// or amqps:// URL (or unset: no broker)")
        return value


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


class TlsSettings(_Frozen):
    """TLS towards one destination (DICOM over TLS, e.g. port 2762)."""

    #: CA bundle that signs the peer's certificate; empty: the system's CAs.
    ca_file: Path | None = None
    #: Our client certificate and key, for peers that require mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Name checked against the peer's certificate; default: the destination host.
    server_hostname: str | None = None


class Destination(_Frozen):
    """A peer that receives the results (used by the sender)."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str
    port: Port
    #: Which result objects this destination takes.
    kinds: tuple[Literal["seg", "sc", "sr", "ko"], ...] = ("seg", "sc", "sr", "ko")
    #: Off by default; set a section (even empty ``tls: {}``) to use TLS.
    tls: TlsSettings | None = None


class SenderSettings(_Frozen):
    """How results are delivered: retries, timeouts, our calling AE title."""

    #: Calling AE title of our associations; default: ``node.ae_title``.
    calling_ae_title: AETitle | None = None
    #: First retry after a transient failure; doubles each attempt (with +-25% jitter).
    retry_initial_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: Longest wait between two attempts.
    retry_max_interval_seconds: Annotated[float, Field(gt=0)] = 600.0
    #: A result not delivered for this long becomes a dead letter (``dcn-node retry``).
    max_age_seconds: Annotated[float, Field(gt=0)] = 86400.0
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0


class QualityGateSettings(_Frozen):
    """When a series gets "not assessable" instead of a probability (the classical anatomy
    of the image decides, not the model)."""

    enabled: bool = True
    #: Less air-filled lung than this (both lungs, ml): no lungs, not a chest CT.
    min_lung_volume_ml: Annotated[float, Field(ge=0)] = 400.0
    #: Slices further apart than this (mm) are too thick for small lesions.
    max_slice_spacing_mm: Annotated[float, Field(gt=0)] = 8.0
    #: Share of the slices with lung whose lung touches the image edge: cut by the FOV.
    max_edge_slice_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    #: Lung area of the first or last slice, as a share of the largest: cut by the scan range.
    max_end_slice_area_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3
    #: Show the model's lesions (SC outline and heat map, SEG lesion segment, SR lesion
    #: measurements and regions, summary.json volumes) on a series the gate finds not
    #: assessable. Off: none are shown, only the banner and the reason: on a cut-off or
    #: non-chest scan the outlines are guesses (a tumour on a cropped scan was drawn as
    #: COVID-19 lesion next to "not assessable").
    report_lesions_when_not_assessable: bool = False


class InferenceSettings(_Frozen):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    profile: Literal["lite", "paper"] = "lite"
    #: Folder with the weights and their manifest; default: the weights shipped in the
    #: package (``dcn_node/models/``).
    models_dir: Path | None = None
    #: Run queued series through the model (off: receive and queue only).
    enabled: bool = True
    #: Backpressure: with this many series waiting for the model, new associations are
    #: refused as transient (the sender retries later); 0 = never refuse.
    queue_high_water: Annotated[int, Field(ge=0)] = 20
    quality_gate: QualityGateSettings = QualityGateSettings()
    #: Tests and benchmarks only, never with a real PACS: no model at all; each series
    #: is "analysed" by sleeping this many seconds and reports no lesion, probability 0,
    #: model version ``sleep-stub`` (a WARNING at start says so). Measures the system
    #: around the model (bench/scale.py). None: the real model.
    stub_seconds: Annotated[float, Field(ge=0)] | None = None


class SegResultSettings(_Frozen):
    """The DICOM Segmentation (lesions, and the lungs unless turned off)."""

    enabled: bool = True
    series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 901
    series_description: Annotated[str, Field(min_length=1, max_length=64)] = (
        "AI lesion segmentation - not for diagnostic use"
    )
    #: Add the lung segment (segment 2) beside the lesion segment (segment 1).
    include_lung: bool = True


class ScResultSettings(_Frozen):
    """The overlay Secondary Captures of the key slices."""

    enabled: bool = True
    series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 902
    series_description: Annotated[str, Field(min_length=1, max_length=64)] = (
        "AI attention overlay - not for diagnostic use"
    )
    #: How many slices with the largest lesion areas become overlays.
    largest_lesion_slices: Annotated[int, Field(ge=0, le=50)] = 3
    #: Also show the slice where the attention map is strongest.
    strongest_attention_slice: bool = True
    #: At most this many overlays per series.
    max_images: Annotated[int, Field(ge=1, le=50)] = 4
    #: Lesion slices shown are at least this far apart (mm), so neighbours showing the
    #: same lesion do not take every place.
    min_slice_distance_mm: Annotated[float, Field(ge=0)] = 10.0
    #: What the heat map shows, always only inside the lungs: ``lesion_probability`` (the
    #: DCN's per-pixel lesion probability, 0-1) or ``attention`` (the map of one
    #: lesion-attention module, scaled to its maximum inside the lungs of the slice). See
    #: the model card (dcn_node/models/README.md) for how well each marks lesions.
    heatmap: Literal["lesion_probability", "attention"] = "lesion_probability"
    #: Which lesion-attention module's map is drawn (the paper's LA modules 1-4).
    attention_module: Annotated[int, Field(ge=1, le=4)] = 3
    #: Opacity of the heat map where attention is highest (0 = not drawn).
    heatmap_opacity: Annotated[float, Field(ge=0, le=1)] = 0.4
    #: Lung window for the CT underneath, HU.
    window_center: float = -600.0
    window_width: Annotated[float, Field(gt=0)] = 1500.0
    #: Smallest width of the image part in pixels; smaller matrices are enlarged.
    min_image_size: Annotated[int, Field(ge=128, le=2048)] = 512


class SrResultSettings(_Frozen):
    """The TID 1500 Comprehensive 3D SR measurement report."""

    enabled: bool = True
    series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 903
    series_description: Annotated[str, Field(min_length=1, max_length=64)] = (
        "AI measurement report - not for diagnostic use"
    )
    #: How many of the largest lesions get a measurement group of their own (outline on
    #: the slice where each is largest, area, mean HU, volume, left or right lung).
    lesion_regions: Annotated[int, Field(ge=0, le=50)] = 5


class KoResultSettings(_Frozen):
    """The Key Object Selection document (key images, IHE AI Results)."""

    enabled: bool = True
    series_number: Annotated[int, Field(ge=1, le=2**31 - 1)] = 904
    series_description: Annotated[str, Field(min_length=1, max_length=64)] = (
        "AI key images - not for diagnostic use"
    )


class ResultsSettings(_Frozen):
    """The DICOM objects made from each analysis: SEG, overlay SCs, a TID 1500 SR and a KOS
    naming the key images."""

    #: Root for the UIDs of result objects (your organisation's root, ending in a dot);
    #: default: pydicom's root. UIDs are derived from the source series, model version,
    #: object kind and index, so a re-run replaces rather than duplicates.
    uid_prefix: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40)] | None = (
        None
    )
    #: Probability at or above which the SR reports the finding as present; default (null):
    #: the decision threshold shipped with the model (chosen for specificity >= 0.95).
    finding_threshold: Annotated[float, Field(ge=0, le=1)] | None = None
    manufacturer: Annotated[str, Field(min_length=1, max_length=64)] = "dcn-node"
    manufacturer_model_name: Annotated[str, Field(min_length=1, max_length=64)] = (
        "DCN COVID-19 CT"
    )
    device_serial_number: Annotated[str, Field(min_length=1, max_length=64)] = "1"
    institution_name: Annotated[str, Field(max_length=64)] | None = None
    station_name: Annotated[str, Field(max_length=16)] | None = None
    seg: SegResultSettings = SegResultSettings()
    sc: ScResultSettings = ScResultSettings()
    sr: SrResultSettings = SrResultSettings()
    ko: KoResultSettings = KoResultSettings()


class MetricsSettings(_Frozen):
    """Prometheus metrics and the health endpoints, over HTTP (docs/operations.md)."""

    #: Serve /metrics, /healthz and /readyz.
    enabled: bool = True
    host: str = "0.0.0.0"
    #: 0 picks a free port (tests); the port in use is logged at start.
    port: Annotated[int, Field(ge=0, le=65535)] = 9108
    #: /readyz fails while a destination's oldest undelivered result is older than this;
    #: 0 = never (free space uses storage.min_free_bytes).
    outbox_stuck_seconds: Annotated[float, Field(ge=0)] = 1800.0


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["human", "json"] = "human"


class Settings(_Frozen):
    """The whole node configuration."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    store: StoreSettings = StoreSettings()
    broker: BrokerSettings = BrokerSettings()
    completion: CompletionSettings = CompletionSettings()
    selection: SelectionSettings = SelectionSettings()
    destinations: tuple[Destination, ...] = ()
    sender: SenderSettings = SenderSettings()
    inference: InferenceSettings = InferenceSettings()
    results: ResultsSettings = ResultsSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _broker_needs_shared_store(self) -> Settings:
        if self.broker.url is not None and self.store.url is None:
            raise ValueError("broker.url needs store.url (a PostgreSQL store): workers "
                             "record their results in the store the nodes share")
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return value


def security_warnings(settings: Settings, config_path: Path | None) -> list[str]:
    """Problems with how secrets are kept: private keys, or a config file that names them,
    readable by other users. Logged as warnings at start and by ``check-config``."""
    warnings = []
    keys = [d.tls.key_file for d in settings.destinations if d.tls and d.tls.key_file]
    if settings.node.tls is not None:
        keys.append(settings.node.tls.key_file)
    if config_path is not None and keys and _others_can_read(config_path):
        warnings.append(f"{config_path} names private keys and is readable by other users "
                        f"(chmod 640 or 600)")
    for key in keys:
        if _others_can_read(key, group=True):
            warnings.append(f"private key {key} is readable by group or others (chmod 600)")
    return warnings


def _others_can_read(path: Path, *, group: bool = False) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (0o044 if group else 0o004))


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
