"""Load: 8 parallel senders x 10 series on loopback; nothing fails, nothing is lost, the
node's memory stays bounded. Bigger runs with the model on: bench/load.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.load import run_load

#: The node process' peak resident memory must stay under this (measured ~90 MiB with
#: the model off); the 80 series sent are ~20 MB, so this is about the process, not data.
PEAK_RSS_LIMIT_BYTES = 400 * 2**20


@pytest.mark.slow
def test_eight_parallel_senders_ten_series_each(tmp_path: Path) -> None:
    report = run_load(tmp_path, senders=8, series_per_sender=10, slices=30, matrix=64)
    print("\n".join(report.lines()))
    assert report.series == 80
    assert report.instances == 80 * 30
    assert report.failed_cstores == 0
    assert report.refused_associations == 0
    assert report.series_lost == 0
    assert report.peak_rss_bytes < PEAK_RSS_LIMIT_BYTES
