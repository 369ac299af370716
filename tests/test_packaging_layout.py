"""The installed package list in pyproject.toml covers every package folder of the tree.

setuptools is given an explicit list (so that kernels/ can install as `latent_kernels`); a new
sub-package missing from it would work from the source tree and vanish from installs.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, name in (("app", "app"), ("engine", "engine"), ("kernels", "latent_kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"missing from pyproject.toml packages: {sorted(found - listed)}"


def test_our_kernels_do_not_shadow_huggingface_kernels():
    import latent_kernels

    assert Path(latent_kernels.__file__).resolve().parent == ROOT / "kernels"
