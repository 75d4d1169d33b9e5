"""ksdk.weights."""
