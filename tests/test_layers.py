"""Layers point one way, and ``import jaxdiv`` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxdiv"

# DESIGN.md: schedules, predictions, metrics, models < samplers, guidance < sample < recipes
# < pipelines; validation, dtypes, sphere and grouping sit at the bottom, testing at the top.
RANK = {
    "validation": 0,
    "dtypes": 0,
    "sphere": 0,
    "pytrees": 0,
    "distributed": 0,
    "host_memory": 0,
    "grouping": 0,
    "schedules": 1,
    "predictions": 1,
    "metrics": 1,
    "models": 1,
    "samplers": 2,
    "guidance": 2,
    "sampling": 3,
    "recipes": 4,
    "pipelines": 5,
    "testing": 6,
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "jaxdiv" else None


def _imports(path: Path):
    """Every jaxdiv module imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxdiv":
                for alias in node.names:
                    yield f"jaxdiv.{alias.name}", node.lineno
            else:
                yield node.module, node.lineno


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        layer = _layer(name) if rel.name != "__init__" or len(rel.parts) > 2 else None
        if layer in RANK:
            yield path, layer


@pytest.mark.parametrize("path,layer", list(_modules()), ids=lambda v: str(v).split("jaxdiv/")[-1])
def test_no_module_imports_a_layer_above_it(path, layer):
    for module, line in _imports(path):
        other = _layer(module)
        if other in RANK and other != layer:
            assert RANK[other] <= RANK[layer], (
                f"{path.relative_to(ROOT.parent)}:{line} ({layer}) imports {module} ({other}), "
                "a layer above it"
            )


def test_guidance_never_imports_sampling():
    offenders = [
        f"{p.relative_to(ROOT.parent)}:{line}"
        for p in (ROOT / "guidance").rglob("*.py")
        for module, line in _imports(p)
        if module.startswith(("jaxdiv.sampling", "jaxdiv.recipes"))
    ]
    assert offenders == []


def test_import_jaxdiv_loads_no_metrics_optax_or_models():
    code = (
        "import sys, jaxdiv\n"
        "from jaxdiv import guidance, samplers, recipes\n"
        "heavy = ('optax', 'flax', 'torch', 'transformers', 'diffusers', 'jaxdiv.metrics', "
        "'jaxdiv.models', 'jaxdiv.pipelines', 'jaxdiv.testing', 'scipy', 'sklearn')\n"
        "print(sorted({m.split('.')[0] if not m.startswith('jaxdiv') else m "
        "for m in sys.modules if m.startswith(heavy)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout


def test_import_jaxdiv_imports_no_jax_until_a_name_is_used():
    # the console command's restart (jaxdiv.host_memory) happens before JAX loads
    code = ("import sys, jaxdiv, jaxdiv.host_memory\n"
            "before = 'jax' in sys.modules\n"
            "sample = jaxdiv.sample\n"
            "print(before, 'jax' in sys.modules, sample.__module__, 'sampling' in dir(jaxdiv))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})  # fmt: skip
    assert out.stdout.split() == ["False", "True", "jaxdiv.sampling", "True"], out.stdout


def test_lazy_submodules_still_load_on_use():
    code = "import jaxdiv\nprint(jaxdiv.metrics.vendi.__name__)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == "vendi"
