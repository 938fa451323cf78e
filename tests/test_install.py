"""A non-editable install works outside the checkout: the console script, the schema as package data.

A fresh virtual environment gets ``pip install --no-deps .`` (a built wheel, not the editable
install); the dependencies come from the test's own environment through a ``.pth`` file naming its
site-packages (a ``.pth`` file inside that folder is not processed from there, so the editable
install living in it stays invisible). Everything runs from a folder outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO, TEST_CONFIG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The fresh environment's bin folder, balancedbio installed into it from a copy of the sources."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip and setuptools come through the .pth file too: no index, no build isolation.
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", str(source)], capture_output=True, text=True, cwd=root, timeout=600,
                          env=_clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env_dir / "bin"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(sys.executable).parent != Path(p))
    return env


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed / "balancedbio"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=_clean_env())


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    code = "import balancedbio, balancedbio.defaults as d; print(balancedbio.__file__); print(d.SCHEMA_PATH)"
    done = subprocess.run([str(installed / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_clean_env(), check=True)
    package, schema = done.stdout.split()
    assert Path(package).is_relative_to(installed.parent) and not Path(package).is_relative_to(REPO)
    assert Path(schema).is_file() and Path(schema).is_relative_to(installed.parent)


def test_balancedbio_train_grpo_help_lists_the_typed_fields(installed, tmp_path):
    done = _run(installed, "train", "grpo", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for option in ("--config", "--mcq", "--model_name_or_path", "--aoc_tau", "--weights_kp", "--num_generations"):
        assert option in done.stdout, option
    assert "aoc.tau in the workflow config" in done.stdout


def test_balancedbio_check_config_passes_the_smoke_config_and_names_a_bad_key(installed, tmp_path):
    done = _run(installed, "check-config", str(TEST_CONFIG), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "valid" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEST_CONFIG.read_text() + "aoc:\n  tau: 2\n")
    done = _run(installed, "check-config", str(bad), cwd=tmp_path)
    assert done.returncode == 1 and "aoc.tau" in done.stderr
