"""Builds the private native extension ksdk._native (pybind11, no libtorch)."""

from setuptools import setup

setup()
