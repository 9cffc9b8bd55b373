"""The package's architecture holds: no import circles, an inference core that reaches nothing from training,
simulation or benchmarks, an image that ships only that core, and every command where the README says it is."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
# what the container runs and ships; nothing in it may import the research rooms or the simulator's packages
SHIPPED = ("valdocmb", "valdocmb.core", "valdocmb.evaluate", "valdocmb.models")
RESEARCH = ("valdocmb.train", "valdocmb.synth", "valdocmb.bench")
ALIASES = ("stagewise", "tune", "compare", "nnunet_train", "benchmark", "nnunet_benchmark")


def modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "valdocmb", "valdocmb"), (ROOT / "models", "valdocmb.models")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (function-level imports included)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def in_room(name: str, rooms) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_shipped_rooms_import_nothing_from_training_simulation_or_benchmarks():
    edges = graph()
    aliases = {f"valdocmb.{alias}" for alias in ALIASES}
    for name, targets in edges.items():
        if in_room(name, SHIPPED[1:]) or name == "valdocmb":
            bad = {t for t in targets if in_room(t, RESEARCH) or t in aliases}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_running_both_methods_loads_no_research_module_and_no_simulator_dependency():
    code = (
        "import sys; from pathlib import Path\n"
        "import valdocmb.core.run as run, valdocmb.core.methods as methods, valdocmb.evaluate\n"
        "methods.load('ensemble', Path('weights'), methods.MethodOptions(device='cpu'))\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('valdocmb', 'nilearn')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.split()
    assert "valdocmb.core.nnunet" in loaded and "valdocmb.models.screening" in loaded
    assert not [m for m in loaded if in_room(m, RESEARCH) or m.startswith("nilearn")], loaded


def test_the_image_copies_only_the_core_the_networks_evaluate_and_the_weights():
    allowed = {"process.py", "pyproject.toml", "README.md", "requirements.txt", "valdocmb/__init__.py",
               "valdocmb/core", "valdocmb/evaluate", "models", "weights"}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            copied |= {w.rstrip("/") for w in words[1:-1] if not w.startswith("--")}
    assert copied and copied <= allowed, copied - allowed
    assert {"valdocmb/core", "valdocmb/evaluate", "models", "weights"} <= copied
    assert "COPY models /opt/app/valdocmb/models" in (ROOT / "Dockerfile").read_text()  # imported as valdocmb.models
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in requirements if r.startswith("nilearn")]  # the image installs requirements.txt


@pytest.mark.parametrize("script,target",
                         tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items())
def test_every_console_script_has_its_main(script, target):
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), script


@pytest.mark.parametrize("alias", ALIASES)
def test_python_dash_m_aliases_run_the_console_scripts_main(alias):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = importlib.import_module(f"valdocmb.{alias}")
    targets = {importlib.import_module(t.split(":")[0]).main for t in scripts.values()}
    assert module.main in targets


def test_every_package_is_installed_by_a_non_editable_install():
    """pyproject lists packages by name: a new subpackage missing there works in the editable checkout and is absent
    from a wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "valdocmb").rglob("__init__.py")}
    assert on_disk <= listed, f"not in pyproject's packages: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("script", sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]))
def test_help_works_without_torch(script):
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, function = target.split(":")
    code = (f"import sys; sys.modules['torch'] = None\nimport {module} as m\n"
            f"try:\n    m.{function}(['--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


# the only places that may write a file other than through core.imageio's checked write path, and why
DIRECT_WRITES_ALLOWED = {
    ("valdocmb/core/imageio.py", "open"),          # the write path itself
    ("valdocmb/core/imageio.py", "write_bytes"),
    ("valdocmb/core/imageio.py", "WriteImage"),
    ("valdocmb/core/run.py", "write_bytes"),       # the output folder's writability probe, removed at once
    ("valdocmb/core/weights.py", "save"),          # torch.save into memory; the bytes then take the write path
    ("valdocmb/core/manifest.py", "open"),         # the manifest's lock file (empty, opened to lock)
    ("valdocmb/bench/jobs.py", "open"),            # a child process's log, written as it runs
}
WRITERS = {"write_text", "write_bytes", "WriteImage", "save"}


def test_every_file_is_written_through_the_one_write_path():
    """Writes that bypass `write_*_atomic`/`write_bytes_checked` leave partial files when killed or on a full disk.
    Calls inside a lambda or function handed to `write_bytes_checked` are that path's own writes."""
    found = []
    for path in [*(ROOT / "valdocmb").rglob("*.py"), *(ROOT / "models").rglob("*.py"), ROOT / "process.py"]:
        relative = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        handed_over = {id(node) for call in ast.walk(tree) if isinstance(call, ast.Call)
                       and getattr(call.func, "id", getattr(call.func, "attr", None)) == "write_bytes_checked"
                       for argument in call.args for node in ast.walk(argument)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in handed_over:
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            writes = name in WRITERS and not (name == "save" and ast.unparse(node.func) not in ("np.save",
                                                                                               "torch.save"))
            opens = name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                           and set(a.value) & set("wax") for a in node.args[1:2])
            if (writes or opens) and (relative, name) not in DIRECT_WRITES_ALLOWED:
                found.append(f"{relative}:{node.lineno} {ast.unparse(node.func)}")
    assert not found, "writes outside the checked write path: " + ", ".join(found)
