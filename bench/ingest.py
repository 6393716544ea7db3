"""Ingest throughput: dcn-node with its fast receive path on and off, against dcmtk's
storescp, same series, same sender, in one run.

Sends one 300-slice 512x512 CT series with dcmtk ``storescu`` (TCP_NODELAY=1) to a node with
``node.transport_tuning: true``, to one with ``false`` (stock pynetdicom; both with durable
spooling: every instance written, renamed into the spool and indexed in SQLite before
Success) and to ``storescp``, in turn each round, and prints images/s for each and the
ratios. Each round gets fresh UIDs so a node never takes the re-send path.

    .venv/bin/python bench/ingest.py [--rounds 5] [--fsync] [--transport-tuning on|off]

Goal (issue 2): node >= 0.5x storescp. ``--minimal`` adds a third target for context: a
minimal pynetdicom SCP (bench/minimal_scp.py: default settings, raw bytes to a folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def refresh_uids(series_dir: Path) -> None:
    """Give the series new Study/Series/SOP Instance UIDs (not timed)."""
    study, series = generate_uid(), generate_uid()
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)


def send(files: list[Path], called_ae: str, port: int) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--fsync", action="store_true", help="node with storage.fsync: true")
    parser.add_argument("--transport-tuning", choices=["on", "off"],
                        help="only a node with node.transport_tuning on or off (default: both)")
    parser.add_argument(
        "--minimal", action="store_true", help="also time a minimal pynetdicom SCP"
    )
    parser.add_argument(
        "--series-dir", type=Path, help="send a copy of this series instead of a phantom"
    )
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: install Debian's dcmtk (make test does)")

    work = Path(tempfile.mkdtemp(prefix="dcn-bench-ingest-"))
    procs: list[subprocess.Popen] = []
    try:
        started = time.perf_counter()
        series_dir = work / "series"
        if args.series_dir:
            shutil.copytree(args.series_dir, series_dir)
        else:
            from dcn_train.phantom import generate_phantom

            case = generate_phantom(work / "case", seed=4242, slices=args.slices, thickness_mm=1.0)
            series_dir = case.series_dir
        files = sorted(series_dir.glob("*.dcm"))
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"series: {len(files)} images, {size_mb:.0f} MB "
            f"(prepared in {time.perf_counter() - started:.1f} s)"
        )

        modes = [args.transport_tuning] if args.transport_tuning else ["on", "off"]
        node_ports = {mode: free_port() for mode in modes}
        scp_port = free_port()
        env = dict(os.environ, TCP_NODELAY="1")
        for mode, port in node_ports.items():
            config = work / f"node-{mode}.yaml"
            config.write_text(
                f"node: {{ae_title: DCN_NODE, host: 127.0.0.1, port: {port}, "
                f"transport_tuning: {str(mode == 'on').lower()}}}\n"
                f"storage: {{spool_dir: {work / f'spool-{mode}'}, "
                f"fsync: {str(args.fsync).lower()}, min_free_bytes: 0}}\n"
                "completion: {quiet_seconds: 3600}\n"
                # Ingest only: the series completes on its announced count, and the model
                # run that would follow must not share the 2 cores with the next receive.
                "inference: {enabled: false}\n"
                "metrics: {enabled: false}\n"
                "logging: {level: WARNING}\n"
            )
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dcn_node", "serve", "--config", str(config)], env=env))
        (work / "storescp").mkdir()
        procs.append(
            subprocess.Popen(
                ["storescp", "-aet", "STORESCP", "-od", str(work / "storescp"), str(scp_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        minimal_port = free_port()
        if args.minimal:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "bench" / "minimal_scp.py"), str(minimal_port),
                     str(work / "minimal")]
                )
            )
            wait_for_port(minimal_port)
        for port in node_ports.values():
            wait_for_port(port)
        wait_for_port(scp_port)

        node_rates: dict[str, list[float]] = {mode: [] for mode in modes}
        scp_rates, minimal_rates = [], []
        for round_number in range(1, args.rounds + 1):
            parts = []
            for mode, port in node_ports.items():
                refresh_uids(series_dir)
                node_s = send(files, "DCN_NODE", port)
                node_rates[mode].append(len(files) / node_s)
                parts.append(f"node fast path {mode} {node_s:.2f} s "
                             f"({node_rates[mode][-1]:.0f} img/s)")
            scp_s = send(files, "STORESCP", scp_port)
            scp_rates.append(len(files) / scp_s)
            line = (f"round {round_number}: {', '.join(parts)}, "
                    f"storescp {scp_s:.2f} s ({scp_rates[-1]:.0f} img/s)")
            if args.minimal:
                minimal_s = send(files, "MINIMAL", minimal_port)
                minimal_rates.append(len(files) / minimal_s)
                line += f", minimal pynetdicom {minimal_s:.2f} s ({minimal_rates[-1]:.0f} img/s)"
            print(line)
        scp_rate = statistics.median(scp_rates)
        mode_label = "fsync on" if args.fsync else "fsync off"
        print(f"median: storescp {scp_rate:.0f} img/s")
        for mode in modes:
            node_rate = statistics.median(node_rates[mode])
            # Each round sends to every target back to back, so a round's ratio compares
            # them at the same machine speed (which drifts on a shared VM).
            paired = statistics.median(
                n / s for n, s in zip(node_rates[mode], scp_rates, strict=True))
            print(f"median: node, fast path {mode} ({mode_label}) {node_rate:.0f} img/s, "
                  f"ratio {node_rate / scp_rate:.2f}x storescp; median of the rounds' ratios "
                  f"{paired:.2f}x (goal >= 0.5x)")
        if len(modes) == 2:
            on_off = statistics.median(
                a / b for a, b in zip(node_rates["on"], node_rates["off"], strict=True))
            print(f"fast path on / off: {on_off:.2f}x (median of the rounds' ratios)")
        node_rate = statistics.median(node_rates[modes[0]])
        if minimal_rates:
            minimal_rate = statistics.median(minimal_rates)
            print(
                f"median: minimal pynetdicom SCP {minimal_rate:.0f} img/s, "
                f"ratio {minimal_rate / scp_rate:.2f}x storescp; node/minimal "
                f"{node_rate / minimal_rate:.2f}x"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
