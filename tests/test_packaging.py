"""The repo's top-level ``kernels/`` and ``integrations/`` folders ship as ``hcmemory.kernels`` and
``hcmemory.integrations`` and never pose as top-level packages: Hugging Face's kernel hub, which
transformers imports, is called ``kernels``, and ``python -c``, ``python -m pytest`` and a REPL in the
checkout put its root first on ``sys.path``.  Checked the way a user meets it: fresh interpreters
started in the repo root, and a wheel built from the repo installed into a throwaway venv."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HF_KERNELS = _has_distribution("kernels")
needs_hf_kernels = pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's `kernels` is not installed here")


def _run(args: list[str], cwd: Path, stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("folder", ["kernels", "integrations"])
def test_shipped_folders_are_not_regular_packages(folder):
    """A folder with an ``__init__.py`` on ``sys.path`` wins over any installed package of its name."""
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists()


@needs_hf_kernels
@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_transformers_finds_hugging_faces_kernels_from_the_repo_root(how):
    """``python -c`` and a REPL (``python -`` reading stdin has the same ``sys.path[0] == ''``)."""
    probe = ("import kernels, transformers.integrations.hub_kernels, hcmemory.kernels.dispatch as d\n"
             "print(kernels.__file__); print(d.__name__)\n")
    out = _run(["-c", probe] if how == "-c" else ["-"], ROOT, None if how == "-c" else probe).split()
    assert Path(out[0]).resolve().is_relative_to(SITE), out
    assert out[1] == "hcmemory.kernels.dispatch"


@needs_hf_kernels
def test_pytest_itself_sees_hugging_faces_kernels():
    """This suite runs as ``python -m pytest`` from the root with ``tests`` a package: the root is on the path."""
    assert str(ROOT) in [str(Path(p or ".").resolve()) for p in sys.path]
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(SITE)


def test_the_shipped_folders_import_as_subpackages_from_anywhere(tmp_path):
    out = _run(["-c", "import hcmemory.kernels.dispatch as d, hcmemory.integrations as i\n"
                      "print(d.choose.__module__); print(list(i.__path__)[0])"], tmp_path).split()
    assert out[0] == "hcmemory.kernels.dispatch"
    assert Path(out[1]).resolve() == ROOT / "integrations"


@pytest.mark.slow
def test_a_wheel_built_from_the_repo_ships_both_folders_inside_the_package(tmp_path):
    """Build the wheel as a user's ``pip install .`` would, install it into a throwaway venv whose other
    dependencies come from this one (no editable finder reaches it), and import from outside the repo."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("hcmemory-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    env_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies, as a plain path entry: .pth files inside it (the editable install's finder) are not run
    (env_site / "deps.pth").write_text(str(SITE) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(env_site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    probe = ("import sys, hcmemory, hcmemory.kernels.dispatch as d, hcmemory.integrations.langchain as lc\n"
             "from hcmemory.folders import CheckoutFolders\n"
             "print(hcmemory.__file__); print(d.__file__); print(lc.__file__)\n"
             "print(any(isinstance(f, CheckoutFolders) for f in sys.meta_path))\n")
    done = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, dispatch_file, langchain_file, finder = done.stdout.split()
    package = Path(package_file).parent
    assert package.is_relative_to(env_site)
    assert Path(dispatch_file) == package / "kernels" / "dispatch.py"
    assert Path(langchain_file) == package / "integrations" / "langchain.py"
    assert (package / "kernels" / "cpu_kernels.cpp").is_file()
    assert finder == "False"
