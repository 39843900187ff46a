"""environment.yml (conda, for clusters) and pyproject.toml pin the same versions."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(requirements):
    out = {}
    for req in requirements:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$", req.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py_pins = pins(project["dependencies"])
    assert all("==" in d for d in project["dependencies"]), "every runtime dependency is pinned"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = pins(pip_section)
    missing = sorted(set(py_pins) - set(env_pins))
    assert not missing, f"environment.yml lacks {missing}"
    differ = {k: (py_pins[k], env_pins[k]) for k in py_pins if py_pins[k] != env_pins[k]}
    assert not differ, f"versions differ (pyproject, environment.yml): {differ}"
    for extra in project["optional-dependencies"].get("test", []):
        name, version = extra.split("==")
        assert env_pins.get(name.lower()) == version, f"{name} test pin differs from environment.yml"
