"""pyproject.toml lists every sub-package: an editable install finds an unlisted one, a wheel does not."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(setuptools["packages"]), setuptools["package-dir"]
    mapped = {(ROOT / folder).resolve() for folder in folders.values()}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            if init.parent.resolve() in mapped and init.parent.resolve() != (ROOT / folder).resolve():
                continue  # a folder mapped to a package of its own (deploy/api is `twinfer` itself)
            rel = init.parent.relative_to(ROOT / folder)
            found.add(name if rel == Path(".") else f"{name}.{'.'.join(rel.parts)}")
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages with no __init__.py: {sorted(listed - found)}"
