"""How the package imports: a light root.

Each check runs in a fresh interpreter (a subprocess): this test process has already imported
most of the package.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers")


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _heavy_modules_after(code: str) -> list[str]:
    report = f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    return json.loads(_run(textwrap.dedent(code) + report).strip().splitlines()[-1])


def test_importing_the_package_loads_neither_torch_nor_diffusers():
    code = """
    import bayesdiff_ext
    assert bayesdiff_ext.__version__
    assert {"LastLayerLaplace", "BayesDiffSampler", "ops", "metrics"} <= set(dir(bayesdiff_ext))
    """
    assert _heavy_modules_after(code) == []


@pytest.mark.parametrize("command", [[], ["demo"], ["sample"], ["fit"], ["eval"]], ids=lambda c: " ".join(c) or "top")
def test_help_loads_neither_torch_nor_diffusers(command):
    code = f"""
    from bayesdiff_ext.cli import main
    try:
        main({command + ["--help"]!r})
    except SystemExit as done:
        assert done.code == 0, done.code
    """
    assert _heavy_modules_after(code) == []


def test_the_console_script_prints_help():
    script = Path(sys.executable).with_name("bayesdiff")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "usage: bayesdiff" in result.stdout, result.stderr


def test_names_load_their_modules_on_first_use():
    _run(
        """
        import sys
        import bayesdiff_ext
        assert "bayesdiff_ext.posterior" not in sys.modules
        from bayesdiff_ext.posterior import LastLayerLaplace
        assert bayesdiff_ext.LastLayerLaplace is LastLayerLaplace
        assert bayesdiff_ext.moment_step is bayesdiff_ext.ops.moment_step
        assert bayesdiff_ext.build_info()["torch_version"]
        try:
            bayesdiff_ext.no_such_name
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError("an unknown name must raise AttributeError")
        """
    )


def test_the_ops_and_their_fake_kernels_are_registered_with_the_ops_module():
    _run(
        """
        import torch
        import bayesdiff_ext
        import bayesdiff_ext.ops
        from torch._subclasses.fake_tensor import FakeTensorMode

        x = torch.ones(2, 3)
        mean, var = torch.ops.bayesdiff_ext.moment_step(x, x, x, None, None, 0.5, 0.25, 0.0, True)
        assert torch.equal(mean, torch.full((2, 3), 0.75)) and torch.equal(var, torch.full((2, 3), 0.25))
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(torch.ones(4, 5, dtype=torch.float16))
            mean, _ = torch.ops.bayesdiff_ext.moment_step(fake, fake, fake, None, None, 1.0, 1.0, 0.0, True)
        assert mean.shape == (4, 5) and mean.dtype == torch.float32
        """
    )


def test_the_version_is_the_installed_distributions():
    code = """
    import importlib.metadata
    import bayesdiff_ext
    print(bayesdiff_ext.__version__ == importlib.metadata.version("bayesdiff_ext"))
    """
    assert _run(code).strip() == "True"

