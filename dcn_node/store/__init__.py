"""What is kept on disk: the spool of received instances and its index (spool), the
outbox of results to send (outbox), refused instances (quarantine), and the index's
schema and migrations (schema), the only place that defines SQL tables.
"""
