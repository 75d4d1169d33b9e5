"""ksdk.layers."""
