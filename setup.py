"""Build shim. Metadata lives in pyproject.toml; this file is where the C++/CUDA extension build will plug in
(``torch.utils.cpp_extension``), which needs imperative code that pyproject.toml cannot express."""

from setuptools import setup

setup()
