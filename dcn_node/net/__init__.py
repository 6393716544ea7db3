"""The DICOM network side: the Storage SCP that receives (receiver), its fast path
(transport_tuning) and limits, and the C-STORE SCU that sends results (sender).
"""
