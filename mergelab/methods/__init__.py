"""Merge methods: one file each, found by name (`get_method`). Shared math lives in `_*.py`."""

from mergelab.methods._common import work_dtype
from mergelab.methods.base import MergeInputs, MergeMethod, Param, get_method, method_names

__all__ = ["MergeInputs", "MergeMethod", "Param", "get_method", "method_names", "work_dtype"]
