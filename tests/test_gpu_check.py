"""scripts/gpu_check.sh, the half that runs here: the wheel list resolves for the GPU machine's Python 3.12 and its
requirement check catches what is missing or at a wrong version; the smoke corpus travels as JSONL that builds the
same data as the corpus packages; the size check refuses a tree over the limit; `run` refuses without CUDA.

The run half itself needs a GPU (tests/test_cuda_*.py run there): nothing here simulates one. Every case runs the
script as a process, with its folders under pytest's tmp_path (GPU_CHECK_DIR), never the repository's gpu/.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from slurm_cluster import ensure_packages

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu_check.sh"
LIST = ROOT / "scripts/gpu_wheels.txt"
MIB = 1 << 20


def gpu_check(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def list_entries(path: Path = LIST) -> list[tuple[str, str, str | None]]:
    """(kind, name, version) per line, as the script reads them: `[kind:] name[==version]`."""
    entries = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            kind, _, spec = line.partition(":") if ":" in line else ("wheel", "", line)
            name, _, version = spec.strip().partition("==")
            entries.append((kind.strip(), name.lower().replace("_", "-"), version or None))
    return entries


def test_script_passes_bash_n_and_shellcheck():
    ensure_packages(["shellcheck"], ["shellcheck"])
    for command in (["bash", "-n"], ["shellcheck"]):
        r = subprocess.run([*command, str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_usage_names_the_commands():
    r = gpu_check()
    assert r.returncode == 2
    assert "prepare|wheels|data|size|run" in r.stderr


def test_wheel_list_carries_the_project_pins():
    """Every runtime dependency of pyproject.toml is carried at its pinned version, or said to be in the image, or
    said to be left behind: a new pin cannot be forgotten on the GPU machine."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", d).groups() for d in deps)
    listed = {name: (kind, version) for kind, name, version in list_entries()}
    for name, version in pins.items():
        name = name.lower().replace("_", "-")
        assert name in listed, f"{name} (pinned in pyproject.toml) is not in {LIST.name}"
        kind, carried = listed[name]
        if kind in ("wheel", "sdist"):
            assert carried == version, f"{name}: {LIST.name} carries {carried}, pyproject.toml pins {version}"
        else:
            assert kind in ("image", "skip"), (name, kind)


def test_a_malformed_list_line_is_refused_before_any_download(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("hjson==3.1.0\nrequests>=2\n")
    r = gpu_check("wheels", GPU_CHECK_DIR=str(tmp_path / "gpu"), GPU_CHECK_LIST=str(bad))
    assert r.returncode != 0
    assert "list.txt:2: 'requests>=2'" in r.stderr and "NAME==VERSION" in r.stderr
    assert not list((tmp_path / "gpu/wheels").glob("*"))


# -- the wheels, for real (the registry) -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_wheel_list_resolves_for_python_3_12_and_a_rerun_downloads_nothing(tmp_path):
    r = gpu_check("wheels", GPU_CHECK_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    carried = [(kind, name, version) for kind, name, version in list_entries() if kind in ("wheel", "sdist")]
    assert f"{len(carried)} packages" in r.stdout and "every requirement is carried or in the image" in r.stdout
    files = sorted(p.name for p in (tmp_path / "wheels").iterdir())
    assert len(files) == len(carried), files  # one file per entry: two versions of one package stop the install
    for kind, name, version in carried:
        stem = f"{name.replace('-', '_')}-{version}"
        [match] = [f for f in files if f.lower().startswith(stem)]
        if kind == "sdist":  # built here (no wheel exists): pure Python, its ops JIT-built on the GPU
            assert match.endswith("-py3-none-any.whl"), match
        else:  # built for CPython 3.12 (or any Python 3) on manylinux x86-64, whatever runs this test
            tags = match[:-len(".whl")].split("-")[-3:]
            assert tags[0] in ("cp312", "py3", "py2.py3", "cp310", "cp311") and tags[1] in ("cp312", "abi3", "none")
            assert tags[2] == "any" or "manylinux" in tags[2] and "x86_64" in tags[2], match
    assert any("cp312-cp312" in f for f in files), "no compiled wheel for Python 3.12"

    again = gpu_check("wheels", GPU_CHECK_DIR=str(tmp_path))
    assert again.returncode == 0 and "downloading" not in again.stdout, again.stdout + again.stderr

    # run's install is one pip call, so every carried command lands in the target's bin/ (a second call's bin/ is
    # skipped by pip --target: the deepspeed launcher was lost); here with the pure wheels (this Python is not 3.12)
    pure = [str(tmp_path / "wheels" / f) for f in files if f.endswith("-none-any.whl")]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", str(site), *pure], check=True, capture_output=True)
    assert {"deepspeed", "gunicorn"} <= {f.name for f in (site / "bin").iterdir()}


@pytest.mark.slow
def test_the_requirement_check_catches_a_missing_package_and_a_wrong_version(tmp_path):
    """gitpython needs gitdb, graphql-relay 3.2.0 needs graphql-core < 3.3: a list that lacks the one and carries
    3.3.2 of the other is refused, naming both; the fixed list passes, and the stale 3.3.2 wheel is removed."""
    wrong, fixed = tmp_path / "wrong.txt", tmp_path / "fixed.txt"
    wrong.write_text("gitpython==3.2.1\ngraphql-relay==3.2.0\ngraphql-core==3.3.2\n")
    fixed.write_text("gitpython==3.2.1\ngitdb==4.0.12\nsmmap==5.0.3\ngraphql-relay==3.2.0\ngraphql-core==3.2.14\n")
    r = gpu_check("wheels", GPU_CHECK_DIR=str(tmp_path), GPU_CHECK_LIST=str(wrong))
    assert r.returncode != 0
    assert re.search(r"gitpython-3\.2\.1-\S+ requires gitdb<5,>=4\.0\.1 \(neither carried nor in the image\)", r.stderr)
    assert re.search(r"graphql_relay-3\.2\.0-\S+ requires graphql-core.*<3\.3.* \(has 3\.3\.2\)", r.stderr), r.stderr
    assert "2 problem(s)" in r.stderr

    r = gpu_check("wheels", GPU_CHECK_DIR=str(tmp_path), GPU_CHECK_LIST=str(fixed))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removing" in r.stderr and "graphql_core-3.3.2" in r.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "wheels").iterdir()) == [
        "gitdb", "gitpython", "graphql_core", "graphql_relay", "smmap"]


# -- the data ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_jsonl_corpus_builds_the_same_smoke_data_as_the_corpus_packages(tmp_path):
    r = gpu_check("data", GPU_CHECK_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load((tmp_path / "corpus/smoke.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs/data/smoke.yaml").read_text())
    assert set(config["languages"]) == set(smoke["languages"]) and config["books"] == smoke["books"]
    for lang, lc in config["languages"].items():
        [source] = lc["sources"]
        assert source["type"] == "jsonl" and Path(source["path"]).is_file(), source

    # What the GPU's data stage builds from the JSONL (the script built it in data/) is what the packages build.
    packages = tmp_path / "from-packages"
    subprocess.run([sys.executable, "pretrain/prepare_data.py", "--config", "configs/data/smoke.yaml",
                    f"output_dir={packages}"], cwd=ROOT, env={**os.environ, "MINIMODEL_TRACKING": "off"},
                   check=True, capture_output=True, timeout=300)
    for lang in config["languages"]:
        for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "tokenizer/sentencepiece.bpe.model"):
            built, reference = tmp_path / "data" / lang / name, packages / lang / name
            assert built.read_bytes() == reference.read_bytes(), f"{lang}/{name} differs"


# -- the size check ----------------------------------------------------------------------------------------------
def tree_bytes() -> int:
    """What the device call sends of the repository: git-tracked + untracked-not-ignored files that exist."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum(os.lstat(ROOT / n.decode()).st_size for n in names if n and os.path.lexists(ROOT / n.decode()))


def test_size_check_sums_the_tree_and_the_carried_folders_and_refuses_over_the_limit(tmp_path):
    tmp_path = tmp_path.resolve()  # the script names folders by their real path
    (tmp_path / "wheels").mkdir()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "wheels/big-1.0-py3-none-any.whl").write_bytes(b"\0" * (3 * MIB))
    (tmp_path / "corpus/en.jsonl").write_bytes(b"x" * (MIB // 2))
    total = tree_bytes() + 3 * MIB + MIB // 2

    ok = gpu_check("size", GPU_CHECK_DIR=str(tmp_path), GPU_CHECK_LIMIT_MIB="64")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"size: {total / MIB:.1f} MiB of the 64 MiB limit" in ok.stdout, ok.stdout
    assert f"{tmp_path}/wheels 3.0 MiB" in ok.stdout and f"{tmp_path}/corpus 0.5 MiB" in ok.stdout
    assert "outside the repository" in ok.stdout  # a tmp folder cannot be carried, and the script says so

    limit = total // MIB  # just under what travels
    over = gpu_check("size", GPU_CHECK_DIR=str(tmp_path), GPU_CHECK_LIMIT_MIB=str(limit))
    assert over.returncode == 1, over.stdout + over.stderr
    assert f"what travels is {total / MIB:.1f} MiB, over the {limit} MiB limit" in over.stderr, over.stderr
    parts = over.stderr.split("Biggest files:")[0]
    assert f"3.0 MiB  {tmp_path}/wheels" in parts and "tree (" in parts and f"0.5 MiB  {tmp_path}/corpus" in parts
    biggest = over.stderr.split("Biggest files:")[1].splitlines()[1]
    assert biggest.strip() == f"3.0 MiB  {tmp_path}/wheels/big-1.0-py3-none-any.whl"


# -- run, here: no GPU -------------------------------------------------------------------------------------------
def test_run_without_cuda_refuses_and_says_nothing_ran(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    r = gpu_check("run", OUT=str(out), GPU_CHECK_SITE=str(site), GPU_CHECK_DIR=str(tmp_path / "gpu"),
                  GPU_CHECK_PYTHON=sys.executable)  # this venv's torch: CPU only
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused: no CUDA device (torch.cuda.is_available() is False" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]  # no logs, results or report of a run
    summary = (out / "summary.txt").read_text()
    assert "overall: REFUSED: no CUDA device" in summary and "(no part ran)" in summary
    assert not re.search(r"\b(passed|failed)\b", summary), summary
    assert not site.exists()  # nothing installed


def test_run_with_a_python_that_has_no_torch_refuses(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    out = tmp_path / "out"
    r = gpu_check("run", OUT=str(out), GPU_CHECK_PYTHON=str(tmp_path / "bare/bin/python"),
                  GPU_CHECK_SITE=str(tmp_path / "site"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torch does not import" in r.stderr and "No module named 'torch'" in r.stderr
    assert "overall: REFUSED: torch does not import" in (out / "summary.txt").read_text()
