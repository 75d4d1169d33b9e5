"""ksdk.testing."""
