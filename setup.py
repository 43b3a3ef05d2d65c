"""The small path's C kernel (attention/small_kernel.c), built against numpy's headers, whose
place only Python can tell; everything else about the project is in pyproject.toml."""

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "attention._small_kernel",
            sources=["attention/small_kernel.c"],
            include_dirs=[numpy.get_include()],
            # No fused multiply-adds, whatever flags the build adds: every product is rounded to
            # float32 before it is summed, on every machine alike.
            extra_compile_args=["-ffp-contract=off"],
        )
    ]
)
