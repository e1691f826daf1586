"""A non-editable install, used from outside the checkout, finds every built-in method and task."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from mtbench import registry


ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_builtins_under_the_package_namespace(tmp_path: Path) -> None:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("mtbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mtbench/methods/lora.py" in names and "mtbench/tasks/glue.py" in names
    assert not any(n.startswith(("methods/", "tasks/")) for n in names), "generic top-level packages installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import mtbench, sys\nfrom mtbench import registry\nregistry.discover()\n"
            "print(mtbench.__file__)\nprint(','.join(registry.methods.names()))\nprint(','.join(registry.tasks.names()))")
    env = {**os.environ, "PYTHONPATH": str(target), "MTBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    location, methods, tasks = done.stdout.strip().splitlines()[-3:]
    assert location.startswith(str(target)), location
    for reg, listed in ((registry.methods, methods), (registry.tasks, tasks)):
        builtins = {n for n in reg.names() if reg.origin(n).startswith("built-in")}
        assert set(listed.split(",")) == builtins
