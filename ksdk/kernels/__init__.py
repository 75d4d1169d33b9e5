"""ksdk.kernels."""
