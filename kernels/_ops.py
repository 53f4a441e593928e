"""Imports every kernel file so that its ops get registered. Add one line per new kernel file."""

from . import bmm_fp8  # noqa: F401
