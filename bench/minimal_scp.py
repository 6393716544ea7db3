"""A minimal pynetdicom Storage SCP for CT, writing each dataset's raw bytes to a folder.

The baseline bench/ingest.py reports beside dcmtk's storescp: pynetdicom's defaults, no
spool, no index, no tuning. Usage: minimal_scp.py PORT OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage


def main() -> None:
    port, out_dir = int(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        path = out_dir / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="MINIMAL")
    ae.add_supported_context(CTImageStorage)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
