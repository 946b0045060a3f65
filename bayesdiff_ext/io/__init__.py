"""Files in and out: input images and models, the output folder of a run, atomic file writes.

The names below load their modules on first use, so that ``bayesdiff_ext.io.atomic`` (used by
every layer that writes files) costs nothing else.
"""

from __future__ import annotations

from bayesdiff_ext._lazy import lazy_names

_ATTRIBUTES = {
    "RunRecord": "bayesdiff_ext.io.outputs",
    "atomic_directory": "bayesdiff_ext.io.atomic",
    "atomic_write": "bayesdiff_ext.io.atomic",
    "check_output_dir": "bayesdiff_ext.io.outputs",
    "timestamped_out_dir": "bayesdiff_ext.io.outputs",
    "write_run": "bayesdiff_ext.io.outputs",
}
_SUBMODULES = ("atomic", "grid", "images", "inputs", "outputs")

__all__ = ["RunRecord", "atomic_directory", "atomic_write", "check_output_dir", "timestamped_out_dir", "write_run"]


__getattr__, __dir__ = lazy_names(__name__, _ATTRIBUTES, _SUBMODULES)
