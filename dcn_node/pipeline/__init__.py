"""From stored instances to recorded results: series completion (series), the model
worker (worker), the encode stage (encoder) and the per-series summary lines (summary).
"""
