"""Builds the private native extension ksdk._native (pybind11, no libtorch).

The module is compiled for baseline x86-64; the AVX2 and AVX512-VNNI kernels are separate translation
units with their own `#pragma GCC target`, picked at run time from CPUID, so one build runs anywhere.
"""

from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("KSDK_BUILD_JOBS", default=0).install()

native = Pybind11Extension(
    "ksdk._native",
    sources=sorted(glob("native/src/*.cpp")),
    include_dirs=["native/include"],
    depends=sorted(glob("native/include/ksdk/*.h") + glob("native/src/*.inc")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[native], cmdclass={"build_ext": build_ext})
