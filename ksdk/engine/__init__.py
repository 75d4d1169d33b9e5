"""ksdk.engine."""
