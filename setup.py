# Metadata lives in pyproject.toml. This file exists so the C++/CUDA extension (csrc/) can be
# added through torch.utils.cpp_extension without changing how the package is installed.
from setuptools import setup

setup()
