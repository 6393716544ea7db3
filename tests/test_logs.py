"""Logging as `dcn-node serve` sets it up: human or JSON lines, the per-series summary
line, and what keeps patient data out of the log whatever libraries do."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcn_node.ops.logs import configure_logging
from dcn_node.pipeline.summary import describe, log_summary

SUMMARY = {"event": "series_summary", "study_instance_uid": "1.2.3", "series_instance_uid":
           "1.2.3.4", "generation": 0, "outcome": "delivered", "instances": 24,
           "probability": 0.8125, "positive": True, "results": {"sent": 3, "dead": 0},
           "seconds": 12.5}


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """configure_logging into a file; the logging set-up is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("dcn_node").level)
    yield tmp_path / "node.log"
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("dcn_node").setLevel(saved[2])
    logging.captureWarnings(False)


def test_json_lines_carry_the_summary_as_fields(log_file: Path) -> None:
    configure_logging("INFO", "json", log_file)
    log_summary(dict(SUMMARY))
    (line,) = log_file.read_text().splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "dcn_node.summary" and entry["level"] == "INFO"
    assert entry["message"] == describe(SUMMARY)
    assert entry["outcome"] == "delivered" and entry["results"] == {"sent": 3, "dead": 0}
    assert entry["probability"] == 0.8125


def test_human_lines_by_default(log_file: Path) -> None:
    configure_logging("INFO", log_file=log_file)
    log_summary(dict(SUMMARY))
    text = log_file.read_text()
    assert text.count("\n") == 1
    assert ("Series 1.2.3.4 delivered: probability 0.812 (positive); 3 sent, 0 dead result "
            "objects; 24 instances; 12.5 s after the last instance") in text


def test_library_debug_and_warning_values_stay_out(log_file: Path) -> None:
    configure_logging("DEBUG", "human", log_file)
    chatty = logging.getLogger("some_library")
    chatty.setLevel(logging.DEBUG)  # a library that turns itself up
    chatty.debug("dataset: PatientName DOE^JANE")
    chatty.info("PatientID 12345")
    logging.getLogger("pydicom").debug("(0010,0010) PN DOE^JANE")
    logging.getLogger("dcn_node.net.receiver").debug("own debug line")
    chatty.warning("library warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Invalid value for VR PN: 'DOE^JANE'.", UserWarning, stacklevel=1)
        warnings.warn('Invalid value for VR PN: "O\'BRIEN^JO".', UserWarning, stacklevel=1)
    text = log_file.read_text()
    assert "own debug line" in text and "library warning" in text
    assert "Invalid value for VR PN: '...'" in text
    for value in ("DOE", "JANE", "12345", "BRIEN"):
        assert value not in text, text
