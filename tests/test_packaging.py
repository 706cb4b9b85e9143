"""The install contract: every code folder is a listed radsynth.* package, and no generic name is installed."""

from pathlib import Path

import tomllib

from .conftest import REPO

ROOTS = {"configs": "radsynth.configs", "generators": "radsynth.generators", "pipelines": "radsynth.pipelines",
         "flows": "radsynth.flows"}


def test_every_package_folder_is_listed_under_the_radsynth_import_root():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in ROOTS.items()}
    on_disk = set()
    for folder, package in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((package, *relative)))
    assert set(setuptools["packages"]) == on_disk
    assert all(name.startswith("radsynth.") for name in setuptools["packages"])


def test_console_script_points_at_the_cli():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"radsynth": "radsynth.flows.cli:main"}
    import radsynth.flows.cli

    assert Path(radsynth.flows.cli.__file__).resolve().parent == REPO / "flows"


def test_prefect_is_imported_only_in_flows():
    offenders = [path for root in ("configs", "generators", "pipelines") for path in (REPO / root).rglob("*.py")
                 if "import prefect" in path.read_text() or "from prefect" in path.read_text()]
    assert offenders == []


def test_the_lock_pins_every_declared_dependency_within_its_range_and_leaves_torch_alone():
    """setup.sh installs constraints.txt: each dependency pyproject declares (the test extra too) at one version
    its range allows; torch is never pinned, so a user's CUDA build is kept."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[canonicalize_name(name)] = pinned
    assert "torch" not in pins
    for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not locked in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {text}"
        assert version(name) == pins[name], f"installed {name} {version(name)} is not the locked {pins[name]}"
    assert "--constraint" in (REPO / "scripts" / "setup.sh").read_text()
