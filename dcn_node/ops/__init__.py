"""What the ops team sees: Prometheus metrics and the health endpoints (metrics, health),
logging (logs) and systemd notification (systemd).
"""
