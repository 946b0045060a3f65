"""How the package imports: a light root, no import cycles, every module importable on its own.

Each check runs in a fresh interpreter (a subprocess): this test process has already imported
most of the package.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayesdiff_ext"
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


# ------------------------------------------------------------------------------------------------
# no cycles, every module on its own
# ------------------------------------------------------------------------------------------------
def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path, name: str, modules) -> set[str]:
    """The package modules ``name`` imports, at module level or inside a function (a lazy import
    is still a dependency). ``from P import X`` depends on P.X when that is a module, otherwise on
    P's ``__init__``; the packages above an imported module do not count (they are already
    importing when it runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, str] = {}
    cycles = []

    def walk(name, stack):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycles_among_the_package_modules():
    cycles = _import_cycles(_module_names())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_cycles_also_through_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    sources = {
        "__init__": "from pkg import c\n",
        "a": "from pkg import b\n",
        "b": "import os\n\nfrom pkg.a import thing\n",
        "c": "def later():\n    from pkg import d\n",
        "d": "from . import c\n",
    }
    modules = {}
    for stem, source in sources.items():
        (package / f"{stem}.py").write_text(source)
        modules["pkg" if stem == "__init__" else f"pkg.{stem}"] = package / f"{stem}.py"
    assert sorted(_import_cycles(modules)) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]]


#: Run in a fresh interpreter: the third-party modules the package imports are loaded once, then
#: every package module is imported in a forked child that has none of the package loaded yet.
#: Importing a module first imports its parent package; a module that its parent package's own
#: import already loaded (checked in an earlier child: names sort packages first) is covered by it.
_ISOLATION_SCRIPT = """
import importlib, json, os, sys, traceback
modules, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    module, _, attribute = name.partition(":")
    try:
        getattr(importlib.import_module(module), attribute or "__name__", None)
    except ImportError:
        pass
assert not any(m == "bayesdiff_ext" or m.startswith("bayesdiff_ext.") for m in sys.modules)
failures, loaded_with = {}, {}
for name in modules:
    if name in loaded_with.get(name.rpartition(".")[0], ()):
        continue
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            report = {"loaded": [m for m in sys.modules if m.startswith("bayesdiff_ext.")]}
        except BaseException:
            report = {"error": traceback.format_exc()}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(child, 0)
    if "error" in report:
        failures[name] = report["error"]
    else:
        loaded_with[name] = set(report["loaded"])
print(json.dumps(failures))
"""


def _third_party_imports(modules) -> list[str]:
    """What the package's modules import from outside it at module level: ``module`` for
    ``import module``, ``module:name`` for ``from module import name`` (diffusers loads its names
    lazily, on attribute access)."""
    found = set()
    for path in modules.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.update(f"{node.module}:{alias.name}" for alias in node.names)
    return sorted(m for m in found if m.split(".")[0].split(":")[0] not in ("bayesdiff_ext", "__future__"))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_on_its_own():
    modules = _module_names()
    arguments = [json.dumps(sorted(modules)), json.dumps(_third_party_imports(modules))]
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATION_SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{message}" for name, message in failures.items())
