"""The C++ extension from an installed (non-editable) pykd: it ships its sources and rebuilds them
just in time when the compiled pykd._C is missing or no longer loads (an ABI mismatch after a torch
upgrade), into a cache keyed by torch version, ISA and sources; otherwise one clear error.

The slow tests build a wheel from a copy of this checkout, install it into a fresh virtual
environment (which sees this environment's torch through a .pth file, nothing else of it) and run
an op there in a subprocess. They compile the sources twice (the wheel, then one just-in-time
rebuild that the other cases find in the cache): about 7.5 CPU-minutes, most of it the compiles,
which ninja spreads over the cores. The same install runs `pykd recommend` from another directory
on a dataset the shipped KD runs table has never seen (package data read through importlib.resources).
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from pykd import _build_flags, _extension
from tests.paths import REPO

EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


# --- where the sources are found and where they are built (fast) ---

def _write_sources(root: Path, *names: str) -> list[Path]:
    (root / "csrc").mkdir(parents=True)
    for name in names:
        (root / "csrc" / name).write_text(f"// {name}\n")
    return sorted(root / "csrc" / name for name in names if name.endswith(".cpp"))


def test_sources_inside_the_installed_package_come_before_a_checkouts(monkeypatch, tmp_path):
    installed = _write_sources(tmp_path / "site" / "pykd", "a.cpp", "a.h")
    checkout = _write_sources(tmp_path / "checkout", "b.cpp")
    monkeypatch.setattr(_extension, "_SOURCE_ROOTS", (tmp_path / "site" / "pykd", tmp_path / "checkout"))
    assert _extension.extension_sources() == installed
    shutil.rmtree(tmp_path / "site")
    assert _extension.extension_sources() == checkout


def test_the_build_cache_is_keyed_by_torch_python_isa_and_sources(monkeypatch, tmp_path):
    sources = _write_sources(tmp_path, "a.cpp", "a.h")
    monkeypatch.setenv("PYKD_BUILD_DIR", str(tmp_path / "cache"))
    first = _extension.build_directory(sources)
    assert first.parent == tmp_path / "cache"
    assert first.name.startswith(f"torch-{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}"
                                 f"{sys.version_info[1]}-{_build_flags.cpu_capability()}-")
    assert _extension.build_directory(sources) == first

    keys = {first}
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "9.9.9")
        keys.add(_extension.build_directory(sources))
    with monkeypatch.context() as patch:
        other = "AVX2" if _build_flags.cpu_capability() == "AVX512" else "AVX512"  # an ISA this host does not report
        patch.setattr(_build_flags, "cpu_capability", lambda: other)
        keys.add(_extension.build_directory(sources))
    (tmp_path / "csrc" / "a.h").write_text("// a changed header\n")
    keys.add(_extension.build_directory(sources))
    assert len(keys) == 4


def test_missing_sources_and_a_failed_build_are_clear_errors(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    undefined = ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")
    monkeypatch.setattr(_extension, "_SOURCE_ROOTS", (tmp_path,))
    with pytest.raises(_extension.ExtensionUnavailableError,
                       match=r"does not load \(.*undefined symbol.*\) and the C\+\+ sources are not beside"):
        _extension._build_just_in_time(undefined)

    _write_sources(tmp_path, "a.cpp")
    monkeypatch.setenv("PYKD_BUILD_DIR", str(tmp_path / "cache"))

    def failing_compiler(**_):
        raise RuntimeError("Error building extension 'pykd_C': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", failing_compiler)
    with pytest.warns(RuntimeWarning, match="building the C\\+\\+ kernels into"), \
            pytest.raises(_extension.ExtensionUnavailableError,
                          match=r"undefined symbol.*building it just in time in .*cache.* failed: .*c\+\+: not "
                                r"found\. A C\+\+17 compiler and ninja"):
        _extension._build_just_in_time(undefined)


def test_ninja_comes_from_the_ninja_package_when_not_on_path(monkeypatch, tmp_path):
    import types

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "ninja", types.SimpleNamespace(BIN_DIR=str(tmp_path)))
    monkeypatch.setenv("PATH", "/nowhere")
    with _extension._ninja_on_path():
        assert os.environ["PATH"] == os.pathsep.join([str(tmp_path), "/nowhere"])
    assert os.environ["PATH"] == "/nowhere"


# --- a real non-editable install in a fresh virtual environment (slow) ---

_CHECKOUT_FILES = ("pyproject.toml", "setup.py", "README.md", "pykd", "kernels", "csrc")

# Run inside the fresh environment: load the extension, run an op through it, say where both came from.
_PROBE = textwrap.dedent("""
    import json, warnings
    import torch
    import pykd
    from pykd import _extension

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            extension = _extension.cpu_extension()
        except _extension.ExtensionUnavailableError as error:
            print(json.dumps({"error": str(error)}))
            raise SystemExit(0)
    try:
        import pykd._C
        installed_loads = "yes"
    except ImportError as error:
        installed_loads = str(error)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 13, generator=gen), torch.randn(3, 11, 13, generator=gen)
    alpha, b = torch.rand(3, generator=gen), torch.randn(3, 11, generator=gen)
    y = pykd.routed_linear(x, w, alpha, b, backend="cpp")
    want = pykd.routed_linear_reference(x.double(), w.double(), alpha.double(), b.double())
    print(json.dumps({"pykd": pykd.__file__, "extension": extension.__file__, "installed_loads": installed_loads,
                      "warnings": [str(w.message) for w in caught],
                      "relative_error": ((y.double() - want).abs().max() / want.abs().max()).item()}))
""")


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _copy_checkout(destination: Path) -> None:
    destination.mkdir()
    for name in _CHECKOUT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(source, destination / name)


def _fresh_environment(root: Path) -> Path:
    """A virtual environment without pip whose only view of this one is its site-packages (torch)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this checkout installed into a fresh virtual environment."""
    root = tmp_path_factory.mktemp("install")
    _copy_checkout(root / "checkout")
    # as in an activated environment: setup.py finds this environment's ninja
    activated = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
          "-w", str(root / "wheels"), str(root / "checkout")], env=activated)
    wheel, = (root / "wheels").glob("pykd_distill-*.whl")
    python = _fresh_environment(root / "venv")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)])
    package = Path(_run([str(python), "-c", "import importlib.util as u; print(u.find_spec('pykd').origin)"],
                        cwd=root).stdout.strip()).parent
    pristine = root / "pristine"
    shutil.copytree(package, pristine, ignore=shutil.ignore_patterns("__pycache__"))
    return {"root": root, "wheel": wheel, "python": python, "package": package, "pristine": pristine,
            "build_dir": root / "cache"}


def _set_extension(installed, compiled: str, sources: bool = True) -> None:
    """Puts the installed package's compiled extension in state `compiled` ("built", "missing",
    "undefined symbol") and its shipped sources in place or not."""
    package, pristine = installed["package"], installed["pristine"]
    extension = package / f"_C{EXT_SUFFIX}"
    extension.unlink(missing_ok=True)
    if compiled == "built":
        shutil.copy(pristine / extension.name, extension)
    elif compiled == "undefined symbol":
        # what an extension built against an older torch does: it needs a symbol that is gone
        stub = installed["root"] / "stub.cpp"
        stub.write_text('extern "C" void pykd_symbol_of_an_older_torch();\n'
                        'extern "C" void* PyInit__C() { pykd_symbol_of_an_older_torch(); return nullptr; }\n')
        _run([os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-o", str(extension), str(stub)])
    shutil.rmtree(package / "csrc", ignore_errors=True)
    if sources:
        shutil.copytree(pristine / "csrc", package / "csrc")


def _probe(installed, build_dir: Path, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(PYKD_BUILD_DIR=str(build_dir), **env)
    done = _run([str(installed["python"]), "-c", _PROBE], cwd=installed["root"], env=environment, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_wheel_ships_the_sources_and_its_compiled_extension_loads(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = sorted(n.removeprefix("pykd/csrc/") for n in names if n.startswith("pykd/csrc/"))
    assert shipped == sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h"))
    assert f"pykd/_C{EXT_SUFFIX}" in names

    _set_extension(installed, "built")
    result = _probe(installed, installed["root"] / "unused-cache")
    assert Path(result["pykd"]).parent == installed["package"]  # the install, not this checkout
    assert Path(result["extension"]) == installed["package"] / f"_C{EXT_SUFFIX}"
    assert result["relative_error"] < 1e-5
    assert not [w for w in result["warnings"] if "building the C++ kernels" in w]
    assert not (installed["root"] / "unused-cache").exists()


@pytest.mark.slow
def test_a_missing_extension_is_rebuilt_into_the_cache(installed):
    _set_extension(installed, "missing")
    result = _probe(installed, installed["build_dir"])
    extension = Path(result["extension"])
    assert extension.name == "pykd_C.so" and extension.parent.parent == installed["build_dir"]
    assert extension.parent.name.startswith(f"torch-{torch.__version__.replace('+', '_')}-")
    assert result["relative_error"] < 1e-5
    assert "No module named 'pykd._C'" in result["installed_loads"]
    assert any("building the C++ kernels" in w for w in result["warnings"])


@pytest.mark.slow
def test_an_extension_that_no_longer_loads_is_rebuilt_or_taken_from_the_cache(installed):
    _set_extension(installed, "undefined symbol")
    result = _probe(installed, installed["build_dir"])
    assert "undefined symbol: pykd_symbol_of_an_older_torch" in result["installed_loads"]
    assert Path(result["extension"]).parent.parent == installed["build_dir"]
    assert result["relative_error"] < 1e-5


@pytest.mark.slow
def test_without_sources_or_a_compiler_the_install_says_so(installed):
    _set_extension(installed, "missing", sources=False)
    result = _probe(installed, installed["root"] / "no-sources")
    assert "the C++ sources are not beside the package" in result["error"]

    _set_extension(installed, "undefined symbol")
    result = _probe(installed, installed["root"] / "no-compiler", CXX="false")
    assert "undefined symbol" in result["error"] and "building it just in time" in result["error"]
    assert "A C++17 compiler and ninja" in result["error"]


@pytest.mark.slow
def test_pykd_recommend_runs_from_the_install_in_another_directory(installed):
    from tests.kd_fixtures import tiny_csv, tiny_teacher

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert {"pykd/distiller/data/kd_runs.csv", "pykd/distiller/data/kd_runs.provenance.json"} <= set(names)
    _set_extension(installed, "built")
    work = installed["root"] / "recommend"
    elsewhere = work / "elsewhere"
    elsewhere.mkdir(parents=True)
    teacher = tiny_teacher(work)  # its classification head is fresh: a teacher, if a poor one, for the meta-features
    base = work / "base.yaml"
    base.write_text(json.dumps({"teacher": {"path": teacher, "finetuned": teacher}, "data": {"max_length": 20}}))
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(PYKD_CACHE=str(work / "cache"), HF_DATASETS_CACHE=str(work / "datasets"),
                       PYKD_BUILD_DIR=str(installed["root"] / "unused-cache"))
    where = _run([str(installed["python"]), "-c", "from pykd.distiller import autodistiller; "
                  "print(autodistiller.packaged_table())"], cwd=elsewhere, env=environment)
    assert Path(where.stdout.strip()) == installed["package"] / "distiller" / "data" / "kd_runs.csv"

    done = _run([str(installed["python"].parent / "pykd"), "recommend", str(base), "--data", tiny_csv(work, rows=60),
                 "--student", "layers=2,hidden=24,heads=2,ffn=40", "--top-k", "2", "--output", "rec"],
                cwd=elsewhere, env=environment, timeout=900)
    assert "[recommend] learning from 57 KD runs on 4 datasets: the table shipped with pykd" in done.stdout
    assert len(list(elsewhere.glob("rec/rank-*/config.yaml"))) == 2, done.stdout
    done = _run([str(installed["python"].parent / "pykd"), "runs-table", "--help"], cwd=elsewhere, env=environment)
    assert "usage: pykd runs-table" in done.stdout
