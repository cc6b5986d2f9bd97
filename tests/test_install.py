"""atlasmix installs like a library: a built wheel (not the source tree) runs the demo, and the
package's dependency ranges are pinned exactly only in the lock file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_dependencies_are_ranges_and_the_lock_pins_each():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if "==" in d] == []
    lock = {}
    for ln in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in ln and not ln.lstrip().startswith("#"):
            n, v = ln.split("==", 1)
            lock[_name(n)] = v.split(";")[0].strip()
    missing = [d for d in deps if _name(d) not in lock]
    assert missing == []


@pytest.mark.slow
def test_the_demo_runs_from_a_built_wheel(tmp_path):
    """Build the wheel, install it (no deps: they are this venv's) into a folder that shadows the source
    tree, and run the demo from an unrelated working directory."""
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (whl,) = wheels.glob("atlasmix-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import atlasmix; print(atlasmix.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "atlasmix.cli", "demo", "--workdir", str(cwd / "demo"), "--cells", "3000",
                        "--mixture", "base_model", "--mixture", "malignant_only", "--seed-replicate", "0",
                        "--budget", "steps=3", "--genes", "50", "--no-check", "--jobs", "1"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (cwd / "demo" / "study" / "report.html").is_file()
    assert (cwd / "demo" / "study" / "results.parquet").is_file()
