"""The wheel: what a user installs holds the package, its schedules and the tuning decisions,
not the raw tuning records."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_decisions_not_records(tmp_path):
    source = tmp_path / "source"  # a copy: the build leaves its build/ folder beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "tvm_fused", "schedules", "tuning_logs"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(source)], check=True,
                   capture_output=True)
    (wheel,) = tmp_path.glob("tvm_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    logs = [name for name in names if name.startswith("tvm_fused/tuning_logs/")]
    decided = {Path(name).parent.name for name in logs if name.endswith("decisions.json")}
    committed = {path.parent.name for path in REPO.glob("tuning_logs/*/*/decisions.json")}
    assert decided == committed and decided
    assert not [name for name in logs if name.endswith(".xz")]
    assert "tvm_fused/schedules/fused.py" in names and "tvm_fused/compiler/definition.py" in names
