"""Shared fixtures: settings in a temp spool, a running node, real DICOM senders."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage

from dcn_node.config import Settings, parse_settings
from dcn_node.net.sender import keep_rejects
from dcn_node.node import Node
from tests.postgres import postgres_server, store_url  # noqa: F401  (one server a session)

NODE_AET = "DCN_NODE"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_config(spool_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config mapping for tests: loopback, free port, short quiet period, small series."""
    base: dict[str, Any] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": 0},
        "storage": {"spool_dir": str(spool_dir), "min_free_bytes": 0},
        "completion": {"quiet_seconds": 1.0, "check_interval_seconds": 0.1, "min_slices": 5},
        "destinations": [],
        "metrics": {"port": 0},
        # Receiving tests look at queued series; tests/test_worker.py turns the model on.
        "inference": {"enabled": False},
    }
    return deep_merge(base, sections)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test function


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


class AssociationRejected(ConnectionRefusedError):
    """The node answered A-ASSOCIATE-RJ: ``reason`` is (result, source, diagnostic)."""

    def __init__(self, reason: tuple[int, int, int]) -> None:
        super().__init__(f"association rejected: result, source, diagnostic = {reason}")
        self.reason = reason


def send_datasets(
    datasets: Sequence[Dataset],
    port: int,
    *,
    calling_aet: str = "TEST_SCU",
    called_aet: str = NODE_AET,
    transfer_syntax: str | None = None,
    tcp_nodelay: bool = False,
) -> list[int]:
    """C-STORE ``datasets`` over one pynetdicom association; returns the statuses.

    With ``tcp_nodelay`` the socket sends at once: without it each small instance waits
    ~45 ms for a delayed ACK on loopback (1,500 16x16 slices: 74 s against 8 s).
    """
    ae = AE(ae_title=calling_aet)
    syntaxes = [transfer_syntax] if transfer_syntax else [ExplicitVRLittleEndian,
                                                          ImplicitVRLittleEndian]
    ae.add_requested_context(CTImageStorage, syntaxes)
    ae.add_requested_context(EnhancedCTImageStorage, syntaxes)
    handlers = [(evt.EVT_ESTABLISHED, _set_tcp_nodelay)] if tcp_nodelay else []
    assoc = associate(ae, port, called_aet=called_aet, handlers=handlers)
    if not assoc.is_established:
        raise ConnectionRefusedError("association not established (aborted or no answer)")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def associate(ae: AE, port: int, *, called_aet: str = NODE_AET,
              handlers: Sequence[tuple[Any, Any]] = ()) -> Any:
    """``ae.associate`` with the node on loopback; raises :class:`AssociationRejected`
    with (result, source, diagnostic) of the A-ASSOCIATE-RJ the node sent.

    The reject is read as it came off the wire (:func:`dcn_node.net.sender.keep_rejects`):
    pynetdicom's requestor may report it as an abort (about once in a thousand refusals on
    a loaded 2-core machine).
    """
    rejects: list[A_ASSOCIATE_RJ] = []
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet,
                         evt_handlers=[(evt.EVT_PDU_RECV, keep_rejects(rejects)), *handlers])
    if rejects:
        answer = rejects[0]
        raise AssociationRejected((answer.result, answer.source, answer.reason_diagnostic))
    return assoc


def _set_tcp_nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY dcmtk stalls ~45 ms per image on delayed ACKs (DICOM-NOTES).
    return {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH: run `make test`, which installs the Debian peers")
    return path


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def start_node(spool_dir: Path) -> Iterator[Callable[..., Node]]:
    """Factory: start an in-process node with test settings (plus overrides per section)."""
    nodes: list[Node] = []

    def _start(**sections: dict[str, Any]) -> Node:
        settings: Settings = parse_settings(test_config(spool_dir, **sections))
        node = Node(settings)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop(timeout=5)


def make_untrained_models(out: Path) -> Path:
    """Write lite-profile weights straight from initialisation (seeded) into ``out``."""
    import torch

    from dcn_node.inference.networks import DCN, PROFILES, SliceProbabilityMapping, UNet
    from dcn_train.trainer import TrainSettings, save_weights

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    profile = PROFILES["lite"]
    save_weights(out, TrainSettings(profile="lite"), UNet(1, profile.unet_width).eval(),
                 DCN(profile).eval(), SliceProbabilityMapping().eval())
    return out


@pytest.fixture(scope="session")
def untrained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite-profile weights straight from initialisation (seeded): the pipeline runs end
    to end, deterministically, without depending on the shipped weights."""
    return make_untrained_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The cache of real CTs (dcn_train.real_ct): fetched once (SHA-256-checked)
    into ``$DCN_NODE_REAL_CT_CACHE`` or ``var/real-ct`` of the checkout, never into git."""
    cache = Path(os.environ.get("DCN_NODE_REAL_CT_CACHE",
                                Path(__file__).resolve().parents[1] / "var" / "real-ct"))
    from dcn_train.real_ct import real_cases

    real_cases(cache)  # fetch everything once, up front
    return cache


#: Per-test limit of tests marked ``slow`` (every other test: ``--timeout`` in pyproject, 120 s).
SLOW_TEST_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (real servers, browsers, kill rounds, training) get
    :data:`SLOW_TEST_TIMEOUT`; a hang anywhere else fails after 120 s."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


@pytest.fixture
def counting_pacs() -> Iterator[Any]:
    """Orthanc as the PACS, counting every instance it stores (re-sends included): the
    cluster tests' "no duplicate result set" is read there."""
    from tests.orthanc import Orthanc, orthanc_workdir

    require_tool("Orthanc")
    with orthanc_workdir() as workdir:
        orthanc = Orthanc(workdir, free_port(), free_port(), count_stores=True)
        orthanc.start()
        try:
            yield orthanc
        finally:
            orthanc.stop()


@pytest.fixture
def broker() -> Iterator[Any]:
    """A RabbitMQ server of the test's own (tests/rabbitmq.py)."""
    from tests.rabbitmq import own_rabbitmq

    with own_rabbitmq() as server:
        yield server
