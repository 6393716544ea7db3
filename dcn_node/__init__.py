"""dcn-node: a DICOM network node that runs the DCN COVID-19 CT model.

Research software trained on synthetic phantoms: not for diagnostic use.
"""

__version__ = "0.1.0"
