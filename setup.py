"""The one native part: the destination's write lane (fusedisk/_lane.c); the rest is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fusedisk._lane", ["fusedisk/_lane.c"], extra_compile_args=["-O2"])])
