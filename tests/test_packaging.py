"""The project's own packaging: it builds without setuptools' warnings (a deprecated license
table fails builds after 2027-02-18) and ships every package and data file it imports."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_quietly_with_everything_in_it(tmp_path):
    # Without build isolation: the venv's own setuptools, nothing downloaded.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    said = built.stdout + built.stderr
    assert "Warning" not in said and "deprecated" not in said, said[-3000:]
    (wheel,) = tmp_path.glob("adl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"workers/data/steering_prompts_closed.txt", "workers/data/NOTICE"} <= names
    for package in ("common", "jobs", "workers", "workers/graders", "storage"):
        assert f"{package}/__init__.py" in names or any(n.startswith(f"{package}/") for n in names), package
