"""ksdk.models."""
