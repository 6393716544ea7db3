"""Logging set-up, done once by the CLI: human lines by default, JSON lines as an option.

Modules only use ``logging.getLogger(__name__)``. They log UIDs, AE titles and reasons,
never patient names, IDs or birth dates. Two things here keep it so for code we do not own:
the configured level applies to dcn-node's own loggers (``dcn_node.*``) while libraries log
at WARNING and above whatever the level (pydicom and pynetdicom dump data element values at
DEBUG), and Python warnings, which pydicom raises with the offending value ("Invalid value
for VR PN: '...'"), go through logging with quoted values withheld.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

#: Our own loggers (the node, and training with its phantoms): logged at the configured
#: level; other libraries' lines only from WARNING up.
OWN_LOGGERS = ("dcn_node", "dcn_train")

_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exception), plus the
    record's ``fields`` (a dict passed as ``extra={"fields": ...}``) as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class PrivacyFilter(logging.Filter):
    """Set on every handler: records of other libraries pass only at WARNING and above
    (even when a library sets its own logger to DEBUG), and captured Python warnings
    (logger ``py.warnings``) keep their first line with quoted values as ``'...'``:
    pydicom's validation warnings quote the element value they reject."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        if not own and record.levelno < logging.WARNING:
            return False
        if record.name == "py.warnings":
            # "file:line: Category: message", without the source line printed below it.
            first_line = record.getMessage().strip().split("\n", 1)[0]
            record.msg = _QUOTED.sub("'...'", first_line)
            record.args = ()
        return True


def configure_logging(
    level: str = "INFO", fmt: str = "human", log_file: Path | None = None
) -> None:
    """Configure the root logger: stderr, plus ``log_file`` (appended) when given."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        if fmt == "json":
            handler.setFormatter(JsonLinesFormatter())
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
            )
        handler.addFilter(PrivacyFilter())
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    root = logging.getLogger()
    root.handlers[:] = handlers
    # Libraries (pynetdicom logs every association at INFO, pydicom values at DEBUG): their
    # warnings and errors only. The configured level is for dcn-node's own modules.
    root.setLevel(max(logging.WARNING, numeric))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)
    # Query/retrieve identifiers (patient data) are never logged, whatever the level.
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom's standard handlers describe every PDU and DIMSE message at DEBUG, which
    # PrivacyFilter drops (other libraries: WARNING and up). Never bound, at any level: bound,
    # they would also switch receiving to pynetdicom's own PDU reading (transport_tuning), so
    # the log level would change the receive path.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
