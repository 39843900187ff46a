"""The parts of scripts/gpu_check.sh that bash does badly: the wheel list, wheel metadata, requirement checks, the
smoke corpus as JSONL, junit counts. `python scripts/gpu_check_helper.py MODE ARGS...` (modes: the branches below)."""
import re
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # minimodel, for the corpus mode


def parse_list(path):
    """[(kind, name, version)] from the list file; kind: wheel / sdist / image / skip; version None: not pinned."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    entries = []
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, spec = line.partition(":") if ":" in line else ("wheel", "", line)
        kind, spec = kind.strip(), spec.strip()
        req = Requirement(spec)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        pinned = kind in ("wheel", "sdist")
        if kind not in ("wheel", "sdist", "image", "skip") or req.specifier and not pins or pinned and not pins:
            sys.exit(f"gpu_check: {path}:{n}: '{raw.strip()}': want NAME==VERSION, 'sdist: NAME==VERSION', "
                     "'image: NAME[==VERSION]' or 'skip: NAME'")
        entries.append((kind, canonicalize_name(req.name), pins[0] if pins else None))
    return entries


def file_id(f):
    """(name, version) of a wheel or sdist file name, or None."""
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
    try:
        name, version = (parse_wheel_filename(f.name)[:2] if f.suffix == ".whl" else parse_sdist_filename(f.name))
    except Exception:
        return None
    return name, str(version)


def metadata(f):
    """The METADATA / PKG-INFO text inside a wheel or sdist."""
    if f.suffix == ".whl":
        with zipfile.ZipFile(f) as z:
            [m] = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            return z.read(m).decode()
    with tarfile.open(f) as t:
        [m] = [n for n in t.getnames() if re.fullmatch(r"[^/]+/PKG-INFO", n)]
        return t.extractfile(m).read().decode()


def unmet(requirements, have, env=None):
    """The requirements (Requires-Dist strings, extras ignored) that `have` {name: version or None} does not meet."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({**(env or {}), "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in have:
            out.append(f"{text} (neither carried nor in the image)")
        elif have[name] is not None and not req.specifier.contains(as_version(have[name]), prereleases=True):
            out.append(f"{text} (has {have[name]})")
    return out


def as_version(text):
    from packaging.version import InvalidVersion, Version
    try:
        return Version(text)
    except InvalidVersion:
        return text


def requires(text):
    return [v.strip() for k, v in (l.split(":", 1) for l in text.splitlines() if ":" in l) if k == "Requires-Dist"]


# Python 3.12 on Linux x86-64, CPython: the GPU machine, for the markers of the requirements.
GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}


def main(mode: str, args: list[str]) -> None:
    if mode == "missing":  # LIST DIR: print 'wheel|sdist NAME==VERSION' not yet in DIR; delete files the list lacks
        entries, folder = parse_list(args[0]), Path(args[1])
        want = {(n, v): k for k, n, v in entries if k in ("wheel", "sdist")}
        have = {}
        for f in sorted(folder.glob("*")) if folder.is_dir() else []:
            key = file_id(f)
            if key in want and f.suffix == ".whl":  # only wheels travel (an sdist entry's is built here)
                have[key] = f
            elif f.is_file():  # an older list's: two versions of one package stop the offline install
                print(f"gpu_check: removing {f} (not in {args[0]})", file=sys.stderr)
                f.unlink()
        for (name, version), kind in want.items():
            if (name, version) not in have:
                print(kind, f"{name}=={version}")
    elif mode == "verify":  # LIST DIR: every entry's file there, and every requirement carried or in the image
        entries, folder = parse_list(args[0]), Path(args[1])
        files = {file_id(f): f for f in folder.glob("*.whl")}
        have = {n: v for k, n, v in entries if k != "skip"}
        problems = []
        for kind, name, version in entries:
            if kind not in ("wheel", "sdist"):
                continue
            f = files.get((name, version))
            if f is None:
                problems.append(f"{name}=={version}: no file in {folder}")
                continue
            problems += [f"{f.name} requires {r}" for r in unmet(requires(metadata(f)), have, GPU_ENV)]
        for p in problems:
            print(f"gpu_check: {p}", file=sys.stderr)
        carried = sum(1 for k, *_ in entries if k in ("wheel", "sdist"))
        if problems:
            sys.exit(f"gpu_check: {len(problems)} problem(s) in {args[0]} (above)")
        print(f"wheels: {carried} packages in {folder}; every requirement is carried or in the image")
    elif mode == "installed":  # LIST: on the GPU machine, the carried packages' requirements against what imports there
        import importlib.metadata as md
        from packaging.utils import canonicalize_name
        have = {}
        for d in md.distributions():  # sys.path order: the carried version first, ahead of the image's
            if d.metadata["Name"]:
                have.setdefault(canonicalize_name(d.metadata["Name"]), d.version)
        problems = []
        for kind, name, version in parse_list(args[0]):
            if kind not in ("wheel", "sdist"):
                continue
            if have.get(name) != version:
                problems.append(f"{name}: {have.get(name, 'absent')} imports, not the carried {version}")
                continue
            problems += [f"{name} requires {r}" for r in unmet(md.requires(name) or [], have)]
        print("\n".join(problems) or "every carried package's requirements are met")
    elif mode == "corpus":  # CONFIG DIR: the config's sources as JSONL files in DIR, and DIR/smoke.yaml reading them
        import json, yaml
        from minimodel.data.corpora import Source, SourceConfig
        config, out = yaml.safe_load(Path(args[0]).read_text()), Path(args[1])
        out.mkdir(parents=True, exist_ok=True)
        books = set(config.get("books") or [])
        for lang, lc in config["languages"].items():
            n = 0
            with open(out / f"{lang}.jsonl.tmp", "w", encoding="utf-8") as f:
                for src in lc["sources"]:  # as the sources yield them: the GPU's data stage cleans them the same way
                    for doc in Source(SourceConfig(**src)).documents():
                        if doc.verse_id is None or not books or doc.verse_id // 1_000_000 in books:
                            f.write(json.dumps({"verse_id": doc.verse_id, "text": doc.text}, ensure_ascii=False) + "\n")
                            n += 1
            (out / f"{lang}.jsonl.tmp").replace(out / f"{lang}.jsonl")
            lc["sources"] = [{"type": "jsonl", "path": str(out / f"{lang}.jsonl")}]
            print(f"corpus: {out / f'{lang}.jsonl'}: {n} documents")
        config["output_dir"] = "data/gpu-smoke"
        header = (f"# {args[0]} with its corpora as JSONL (scripts/gpu_check.sh data): the GPU machine has no corpus "
                  "packages.\n# Paths are relative to the repository root.\n")
        (out / "smoke.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    elif mode == "junit":  # XML: 'N passed, N failed, N skipped' of a pytest junit file
        import xml.etree.ElementTree as ET
        root = ET.parse(args[0]).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        total = lambda k: sum(int(s.get(k, 0)) for s in suites)
        bad = total("failures") + total("errors")
        print(f"{total('tests') - bad - total('skipped')} passed, {bad} failed, {total('skipped')} skipped")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
