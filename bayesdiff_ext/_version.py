"""The package's version, written once (pyproject.toml reads it from here when the package is
built), and the versions of what produced a result, recorded with runs and saved posteriors."""

import platform

__version__ = "0.1.0"


def library_versions() -> dict[str, str | None]:
    """Versions of bayesdiff_ext, torch, diffusers (None when it is not installed) and Python."""
    import torch

    try:
        import diffusers
    except ImportError:
        diffusers = None
    return {
        "bayesdiff_ext": __version__,
        "torch": torch.__version__,
        "diffusers": None if diffusers is None else diffusers.__version__,
        "python": platform.python_version(),
    }
