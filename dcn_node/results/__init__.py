"""Result objects for the PACS: DICOM SEG, overlay Secondary Captures, TID 1500 SR.

``build_results(volume, result, settings)`` returns a :class:`ResultSet`;
``ResultSet.write(out_dir)`` stores ``seg/``, ``sc/``, ``sr/``. See docs/results.md.
"""

from dcn_node.results.builder import KINDS, ResultSet, build_results
from dcn_node.results.seg import ResultEncodingError

__all__ = ["KINDS", "ResultEncodingError", "ResultSet", "build_results"]
