"""The three top-level folders install under the one name seedtune, and nothing else does."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_only_the_seedtune_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("seedtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name.startswith(("seedtune/", "seedtune-")) for name in names), names
    sources = {str(path.relative_to(ROOT)) for folder in ("common", "client", "server", "jobs", "bench", "cli")
               for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".toml")}
    packaged = {name.removeprefix("seedtune/") for name in names}
    assert sources <= packaged, sources - packaged  # no module or preset left out of the wheel


def test_no_top_level_common_client_or_server_module_is_importable(tmp_path):
    probe = ("import importlib.util as u; import seedtune.common, seedtune.client, seedtune.server, seedtune.jobs, "
             "seedtune.bench; print([n for n in ('common', 'client', 'server', 'jobs', 'bench', 'cli') if u.find_spec(n)])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.strip() == "[]"


def test_imports_point_one_way_common_before_client_and_server():
    forbidden = {"common": ("client", "server", "jobs", "bench", "cli"), "client": ("server", "jobs", "bench", "cli"),
                 "server": ("client", "jobs", "bench", "cli"), "jobs": ("bench", "cli"), "bench": ("cli",)}
    for folder, others in forbidden.items():
        for path in (ROOT / folder).rglob("*.py"):
            imports = re.findall(r"^\s*(?:from|import)\s+seedtune\.(\w+)", path.read_text(), re.MULTILINE)
            assert not set(imports) & set(others), f"{path} imports {set(imports) & set(others)}"
