"""ksdk.offload."""
