"""Whether a stage's output directory holds a result of *this* config: one record per output directory.

Every stage function calls `claim_output(output_dir, cfg, ...)` before it writes anything and
`finish_output(output_dir, cfg)` once its result is complete. The record (`.minimodel-config.json`, written
atomically) holds the config that made the directory, minus the keys that do not change the result (NEUTRAL_KEYS:
tracking, output_dir, overwrite, how often a loop saves and prints, plus the stage's own) plus the number of ranks
where it ran on more than one (a training stage's global batch depends on it), and the records of the inputs it read
(any config value naming a path at or under another stage's output directory, and any model directory or file no
stage made, by the hash of its weights or content, and a directory of data a DATA setting names by its files'): so a
result is "of this config" only if it was made from the same upstream results and given inputs too.

    same config and inputs, finished   -> "finished" (a training stage skips or resumes to the end: a no-op)
    same config and inputs, unfinished -> "resume"
    no record and nothing there        -> "new"
    another config:
        resumable stages (checkpoints: pretrain, minipost, adapt, finetune): UserError naming the differing keys
        and the fix, unless `overwrite` (then the directory is emptied first: "new")
        other stages (replace their outputs atomically, whole: data, export, plug, zero_shot, report): "new",
        the change honoured by redoing them
    files without a record (no stage wrote them), the working or home directory: NotAnOutputDirectory, whatever
        `overwrite` says (a stage may empty or replace its directory whole)
A stage may give its result's content hash (`finish_output(..., content=...)`: the word vectors' bytes): its
consumers record that, so the result made again byte for byte (after a change of how it is evaluated) is still their
input, and made again otherwise (from a corpus edited in place) is not, whatever the config says.
Never a silent skip: a stage may skip only on "finished". A record is read with the default of every setting its
config class gained since it was written (a new setting's default keeps the behaviour the code had before): a result
made then stays valid for a config that leaves the setting at its default, and not for one that sets it.

Results made of parts (the data stage: one directory per language). Each part has a record of its own
(`write_part`, in `<output_dir>/<lang>/`: the config less the other languages' keys, and the stage's hash of what
the part depends on as its digest), and the whole's record lists the parts' digests (`finish_output(...,
parts=...)`). A path under a part resolves to the part's record, so a consumer of one language depends on that
language only; a consumer of the whole directory depends on the parts it saw and still matches when parts are added
(`uses` narrows it to the parts it reads: adaptation of `sw` reads `<data_dir>/sw` only). A part made again under
another config names what changed in the message of every consumer that refuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch.distributed as dist

from minimodel import distributed
from minimodel.config import flatten
from minimodel.errors import UserError
from minimodel.files import write_text_atomic
from minimodel.manifest import ManifestError, directory_sha256, file_sha256, model_hash

log = logging.getLogger(__name__)

RECORD = ".minimodel-config.json"
# Keys whose value does not change a stage's result (where it logs, where it writes, whether it may replace).
NEUTRAL_KEYS = ("tracking", "output_dir", "overwrite",
                # how often a training loop saves and prints, and how many checkpoints it keeps: a resumed run may
                # change them (checkpoint more often after a preemption)
                "train.checkpoint.save_every", "train.checkpoint.keep_last", "train.log_every")
RANKS = "world_size"  # recorded beside the config of a stage run on more than one rank
# the identity of an input no stage made: a model (the user's primary, a teacher) by its weights, a file (word
# vectors of the user's own) by its content, a directory of data (a task's release files) by its files' content
GIVEN_MODEL, GIVEN_FILE, GIVEN_DATA = "weights sha256 ", "file sha256 ", "data sha256 "
GIVEN = {GIVEN_MODEL: "weights", GIVEN_FILE: "content", GIVEN_DATA: "files"}  # prefix -> what it hashes
# Field metadata of a setting that names a directory of input data (TaskConfig.data_dir): one no stage made counts
# by its files' content. Other directories count by path only (a run's own directory is no input to hash whole).
DATA = {"provenance": "data"}
SHIPPED = Path(__file__).resolve().parents[1] / "configs"  # the project's own settings files: versioned with the code

Claim = Literal["new", "resume", "finished"]


class ConfigChanged(UserError):
    """The output directory holds a result (or a partial run) of another config."""


class NotAnOutputDirectory(UserError):
    """The output directory named is not a stage's own: the working directory or one above it, the home directory,
    or a directory of files no stage wrote."""


class InputsChanged(UserError):
    """An input of a stage changed while it ran (a model replaced at its path, an upstream stage redone): its result
    is of neither version."""


# What each output directory was claimed with in this process, (fingerprint, uses): what its finished record may
# vouch for.
_claimed: dict[Path, tuple[dict, Mapping[str, Iterable[str]] | None]] = {}


def _neutral(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith((f"{n}.", f"{n}[")) for n in (*NEUTRAL_KEYS, *ignore))


def read(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _nearest(path: str | Path) -> tuple[Path, dict] | tuple[None, None]:
    path = Path(path).absolute()
    for directory in (path, *path.parents):
        record = read(directory)
        if record is not None:
            return directory, record
    return None, None


def identity(path: str | Path) -> str | dict | None:
    """The digest of the finished stage result `path` lies in (the nearest record at or above it), {"parts":
    {part: digest}} for a whole made of parts, "unfinished" if that stage has not finished, None if no stage made it
    (e.g. a model or corpus the user brought)."""
    _, record = _nearest(path)
    if record is None:
        return None
    if record["status"] != "finished":
        return "unfinished"
    return {"parts": record["parts"]} if "parts" in record else _result(record)


def _result(record: dict) -> str:
    """What a consumer records of a finished result: the hash of its content where the stage gave one (finish_output's
    `content`: made again the same, e.g. after a change of how it is evaluated, it is the same input), else its
    config's digest."""
    return record.get("content") or record["digest"]


def given_input(path: str | Path, data: bool = False) -> str | None:
    """The identity of an input no stage made: a Hugging Face model directory by the hash of its weights, a file by
    its content's, with `data` (a DATA setting) a directory by its files' (replaced at the same path, it is another
    input, not the one a result was made from); None for anything else, and for the project's own settings files
    (configs/)."""
    path = Path(path)
    if (path / "config.json").is_file():
        try:
            return GIVEN_MODEL + model_hash(path)
        except ManifestError:  # a config without weights: not a model
            return None
    if path.is_file() and not path.resolve().is_relative_to(SHIPPED):
        return GIVEN_FILE + file_sha256(path)
    if data and path.is_dir():
        return GIVEN_DATA + directory_sha256(path)
    return None


def data_keys(config: Any, prefix: str = "") -> set[str]:
    """The dotted keys of the DATA settings of `config` (a config, or a config class), its sections' included."""
    keys = set()
    sections = typing.get_type_hints(config) if isinstance(config, type) else vars(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("provenance") == DATA["provenance"]:
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(section := sections[f.name]):
            keys |= data_keys(section, f"{prefix}{f.name}.")
    return keys


def _json(value: Any) -> Any:
    """As the record will read back (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(value, default=str))


def _config(cfg: Any, ignore: tuple[str, ...]) -> dict:
    return _json({k: v for k, v in flatten(dataclasses.asdict(cfg), lists=True).items() if not _neutral(k, ignore)})


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(cfg: Any, ignore: tuple[str, ...] = (), uses: Mapping[str, Iterable[str]] | None = None,
                writes: tuple[str, ...] = ()) -> dict:
    """{"config": {dotted key: value}, "inputs": {dotted key: identity}, "digest"}: what decides the result.
    `uses`: for a config key naming a whole made of parts, the parts this result reads (the others do not count).
    `writes`: config keys naming where the stage itself writes besides output_dir (a checkpoint dir): not inputs."""
    config = _config(cfg, ignore)
    # the global batch, and so the result, depends on it (unless the config sets it: `ignore` then names RANKS)
    if (ranks := distributed.world_size()) > 1 and not _neutral(RANKS, ignore):
        config[RANKS] = ranks
    inputs, data = {}, data_keys(cfg)
    for key, value in config.items():
        if key not in writes and isinstance(value, str) and value and ("/" in value or Path(value).exists()):
            found = identity(value) or given_input(value, data=key in data)
            if isinstance(found, dict) and uses and key in uses:
                found = {"parts": {part: found["parts"].get(part) for part in uses[key]}}
            if found is not None:
                inputs[key] = found
    return {"config": config, "inputs": inputs, "digest": _digest(config, inputs)}


def part_fingerprint(cfg: Any, digest: str, ignore: tuple[str, ...] = ()) -> dict:
    """The fingerprint of one part of a result (a language of the data stage): its config (`cfg` less `ignore`,
    e.g. the other languages' keys), to name what changed, and `digest`, the stage's own hash of everything the part
    depends on (settings, input content, library versions): it changes exactly when the part would be made again."""
    return {"config": _config(cfg, ignore), "inputs": {}, "digest": digest}


def _covers(new: Any, old: Any) -> bool:
    """The input identity `new` still holds what `old` recorded: the same, or a whole with the old parts unchanged."""
    if isinstance(new, dict) and isinstance(old, dict):
        return all(part in new["parts"] and new["parts"][part] == d for part, d in old["parts"].items())
    return new == old


def _whole_digest(path: str | Path) -> str | None:
    """The digest of the finished whole (a record with parts) at or above `path`: what a consumer recorded for a
    path under it before parts had records of their own."""
    path = Path(path).absolute()
    for directory in (path, *path.parents):
        record = read(directory)
        if record is not None and "parts" in record:
            return record["digest"] if record["status"] == "finished" else None
    return None


def _alias(path: str | Path) -> str | None:
    """The config digest the finished result at or above `path` was known by before it had a content identity
    (finish_output's `content`), while its content is still that one."""
    _, record = _nearest(path)
    return record.get("alias") if record is not None and record["status"] == "finished" else None


def _matches(old: dict, new: dict) -> tuple[bool, dict]:
    """(whether the record `old` is of the config and inputs `new`, the inputs to upgrade in it): the same config,
    and every input covering the recorded one (a whole that gained parts), or, for a record older than part records,
    the whole's digest it recorded unchanged (for one older than given models' identities, their identity)."""
    if old.get("config") != new["config"]:
        return False, {}
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    # a record older than given inputs' identities lacks theirs: the same result, now naming their content
    upgrade = {key: value for key, value in new_inputs.items()
               if key not in old_inputs and str(value).startswith(tuple(GIVEN))}
    if set(old_inputs) != set(new_inputs) - set(upgrade):
        return False, {}
    for key, value in new_inputs.items():
        if key in upgrade or _covers(value, old_inputs[key]):
            continue
        if isinstance(old_inputs[key], str) and old_inputs[key] in (_whole_digest(new["config"][key]),
                                                                    _alias(new["config"][key])):
            upgrade[key] = value
            continue
        return False, {}
    return True, upgrade


def _why(path: Path, old: Any) -> str:
    """" (key: a -> b; ...)" when the record now at `path` replaced the one whose digest the consumer recorded."""
    _, record = _nearest(path)
    previous = (record or {}).get("previous") or {}
    if previous.get("digest") == old and previous.get("changes"):
        return f" ({'; '.join(previous['changes'])})"
    return ""


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for each config key and input that differs."""
    old_config, new_config = old.get("config", {}), new["config"]
    lines = [f"{key}: {old_config.get(key, '(unset)')!r} -> {new_config.get(key, '(unset)')!r}"
             for key in sorted(set(old_config) | set(new_config)) if old_config.get(key) != new_config.get(key)]
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        before, now = old_inputs.get(key), new_inputs.get(key)
        if old_config.get(key) != new_config.get(key) or (now is not None and _covers(now, before)):
            continue
        path = Path(str(new_config.get(key)))
        if isinstance(before, dict):
            changed = [part for part, d in before["parts"].items()
                       if not isinstance(now, dict) or now["parts"].get(part) != d]
            lines += [f"{key}: {path / part} was made again since{_why(path / part, before['parts'][part])}"
                      for part in changed]
        elif str(before).startswith(tuple(GIVEN)) and str(now).startswith(tuple(GIVEN)):
            what = next(what for prefix, what in GIVEN.items() if str(now).startswith(prefix))
            lines.append(f"{key}: {path} holds other {what} since ({_short(before)} -> {_short(now)})")
        else:
            lines.append(f"{key}: {path} was made again since{_why(path, before)}")
    return lines


def changed_inputs(output_dir: str | Path, _seen: set[Path] | None = None) -> list[str]:
    """What changed since the finished result in `output_dir` was made: `key: path was made again since (...)` for
    each input another stage made that is not the result recorded (made again, or unfinished), else the first input
    whose own inputs changed so, up the chain (zero-shot scores of a plugged model whose embeddings were learned again
    since the plugging: a reader pairing them with that adaptation's compute pairs two runs); [] where none did or
    there is no record. Given inputs (hashed by content) are not read again here: a reader of results (the report)
    checks that what it pairs a result with is still what made it."""
    record = read(output_dir)
    if record is None or "config" not in record:
        return []
    inputs = record.get("inputs", {})
    made = {key: old for key, old in inputs.items() if not str(old).startswith(tuple(GIVEN))}
    now = {**inputs, **{key: identity(record["config"][key]) for key in made}}
    if not _matches(record, {"config": record["config"], "inputs": now})[0]:
        return differences(record, {"config": record["config"], "inputs": now})
    seen = set() if _seen is None else _seen
    for key in made:
        upstream, _ = _nearest(record["config"][key])
        if upstream is None or upstream in seen:
            continue
        seen.add(upstream)
        if changed := changed_inputs(upstream, seen):
            return [f"{key}: {record['config'][key]} was made from results that changed since ({'; '.join(changed)})"]
    return []


def _short(given: str) -> str:
    return next(given.removeprefix(p) for p in GIVEN if given.startswith(p))[:12]


def _previous(old: dict | None, new: dict) -> dict | None:
    """What a record replacing `old` keeps of it: the finished result it replaces (its digest and what changed),
    for the messages of consumers that recorded it."""
    if old is None:
        return None
    if old["status"] == "finished" and _result(old) != _result(new):
        # the same config and inputs making other content: something it read in place changed (a corpus)
        return {"digest": _result(old), "changes": differences(old, new) or ["other content from the same config"]}
    return old.get("previous")


def _write(output_dir: Path, record: dict, status: str, previous: dict | None = None) -> None:
    record = {k: v for k, v in record.items() if k not in ("status", "previous")}
    record = {**record, "status": status, **({"previous": previous} if previous else {})}
    write_text_atomic(Path(output_dir) / RECORD, json.dumps(record, indent=1, default=str))


def claim_output(output_dir: str | Path, cfg: Any, *, resumable: bool, overwrite: bool = False,
                 ignore: tuple[str, ...] = (), uses: Mapping[str, Iterable[str]] | None = None,
                 writes: tuple[str, ...] = ()) -> Claim:
    """Decide what `output_dir` holds for `cfg` (see the module doc) and record `cfg` as its config (status
    "started"). Raises ConfigChanged for a resumable stage whose directory holds another config's result or
    partial run, unless `overwrite`. `uses`: the parts of a whole this result reads, by config key (fingerprint).
    Under torch.distributed, rank 0 decides and writes and every rank returns (or raises) the same; call it on
    rank 0 only before the process group is up."""
    def decide() -> Claim:
        claimed = fingerprint(cfg, ignore, uses, writes)
        _claimed[Path(output_dir).absolute()] = claimed, uses
        return _claim(Path(output_dir), cfg, claimed, resumable, overwrite, ignore)

    if not dist.is_initialized():
        return decide()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = decide()
        except UserError as e:  # every rank raises it (the others would wait for rank 0 forever)
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def _setting_defaults(cfg: Any, ignore: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: default} of the plain settings of cfg's config class (not entries of a mapping or list, whose
    absence from a record says something), less `ignore`; {} for a class that has no default instance."""
    try:
        default = type(cfg)() if dataclasses.is_dataclass(cfg) else None
    except TypeError:  # a field without a default
        default = None
    if default is None:
        return {}
    found: dict[str, Any] = {}

    def walk(config: Any, prefix: str) -> None:
        for f in dataclasses.fields(config):
            value, key = getattr(config, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            elif not isinstance(value, (dict, list, tuple)) and not _neutral(key, ignore):
                found[key] = _json(value)

    walk(default, "")
    return found


def _recorded(output_dir: Path, cfg: Any, ignore: tuple[str, ...]) -> dict | None:
    """The record in `output_dir`, less the config keys and inputs `ignore` names (one written when they counted), read
    with the default of every setting added to the config since it was written (a new setting's default keeps the
    behaviour it had before the setting existed, so a result made then is still of a config that leaves it there)."""
    record = read(output_dir)
    if record is None or "config" not in record:
        return record
    config = {k: v for k, v in record["config"].items() if not _neutral(k, ignore)}
    added = {k: v for k, v in _setting_defaults(cfg, ignore).items() if k not in config}
    record["config"] = {**added, **config}
    record["inputs"] = {k: v for k, v in record.get("inputs", {}).items() if not _neutral(k, ignore)}
    return record


def _check_own_directory(output_dir: Path) -> None:
    """Refuse an output directory a stage must not empty or replace: an empty path (`output_dir=$UNSET`), the
    working directory, one above it, or the home directory."""
    path, cwd, home = output_dir.resolve(), Path.cwd().resolve(), Path(os.path.expanduser("~"))
    home = home.resolve() if home.is_absolute() else None  # a process with no home directory (Path.home raises)
    if path in (home, cwd, *cwd.parents):
        what = "the home directory" if path == home else \
            "the working directory" if path == cwd else "a directory above the working directory"
        raise NotAnOutputDirectory(
            f"output directory {str(output_dir)!r} is {path}, {what}: a stage's output directory is its own (it may "
            "be emptied or replaced whole); name one, e.g. runs/<name>")


def _claim(output_dir: Path, cfg: Any, new: dict, resumable: bool, overwrite: bool,
           ignore: tuple[str, ...]) -> Claim:
    _check_own_directory(output_dir)
    old = _recorded(output_dir, cfg, ignore)
    if old is not None:
        matched, upgrade = _matches(old, new)
        if matched:
            if upgrade:  # recorded before part records or given models' hashes: the same inputs, now named so
                _write(output_dir, {**old, "inputs": {**old["inputs"], **upgrade}}, old["status"],
                       old.get("previous"))
            return "finished" if old["status"] == "finished" else "resume"
    if old is None and output_dir.is_dir() and any(output_dir.iterdir()):  # a stage may empty or replace it whole
        raise NotAnOutputDirectory(
            f"{output_dir} holds files no minimodel stage wrote (no {RECORD}): nothing there is replaced or deleted, "
            f"with overwrite=true neither; name a new or empty output directory")
    if resumable and old is not None:
        what = f"{'a finished result' if old['status'] == 'finished' else 'a partial run'} of another config"
        if not overwrite:
            changed = "; ".join(differences(old, new))
            raise ConfigChanged(
                f"{output_dir} holds {what} ({changed}): its checkpoints and results are not this config's. Use a "
                f"new output_dir to keep both, or pass overwrite=true to discard the old one")
        log.warning("%s: discarding %s (overwrite=true)", output_dir, what)
        shutil.rmtree(output_dir)
    elif old is not None:
        log.info("%s: config changed (%s): redoing it", output_dir, "; ".join(differences(old, new)))
    _write(output_dir, new, "started", _previous(old, new))
    return "new"


def keep_claim(output_dir: str | Path, replacement: str | Path) -> None:
    """Copy `output_dir`'s record into `replacement`, the finished directory about to replace it whole (plug): cut
    short between the swap and finish_output, it is still a claimed run of this config, redone by the next run (else
    a directory no stage wrote, refused)."""
    shutil.copy2(Path(output_dir) / RECORD, Path(replacement) / RECORD)


def finish_output(output_dir: str | Path, cfg: Any, ignore: tuple[str, ...] = (), *,
                  uses: Mapping[str, Iterable[str]] | None = None, parts: Mapping[str, str] | None = None,
                  content: str | None = None, writes: tuple[str, ...] = ()) -> None:
    """Record `cfg`'s result in `output_dir` as complete (call it on one rank, after the last file is written).
    The claimed record is marked finished when it is of this config (the inputs it recorded are those the result
    was made from); else written afresh: a stage may have replaced its whole output directory (plug). Left alone
    when it already says so (a no-op rerun changes nothing). `parts`: {part: digest} of a whole made of parts (each
    part's own record written by write_part). `content`: the hash of the result's content, what its consumers then
    record of it instead of the config's digest (a result made again byte for byte stays theirs). Raises
    InputsChanged, recording nothing, when the inputs are not those this process claimed the directory with (one
    changed while the stage ran)."""
    output_dir = Path(output_dir)
    new, old = fingerprint(cfg, ignore, uses, writes), _recorded(output_dir, cfg, ignore)
    if (claim := _claimed.get(output_dir.absolute())) is not None:
        claimed, claimed_uses = claim
        now = new if uses == claimed_uses else fingerprint(cfg, ignore, claimed_uses, writes)  # the parts it read
        if not _matches(claimed, now)[0]:  # a whole that gained parts still matches
            raise InputsChanged(f"{output_dir}: its inputs changed while it ran "
                                f"({'; '.join(differences(claimed, now))}): its result is of neither version and is "
                                "not marked finished. Run it again")
    if parts is not None:
        new["parts"] = _json(dict(parts))
    if content is not None:
        new["content"] = content
    if old is not None:
        matched, upgrade = _matches(old, new)
        if matched and old.get("parts") == new.get("parts"):
            kept = {**old, "inputs": {**old["inputs"], **upgrade}}
            if old.get("content") == new.get("content"):
                if old["status"] != "finished" or upgrade:
                    _write(output_dir, kept, "finished", old.get("previous"))
                return
            if old["status"] == "finished" and "content" not in old:
                # finished before content identities and not made again since (a stage that redoes its result
                # reopens it first): the digest its consumers recorded stands for this content
                _write(output_dir, {**kept, "content": content, "alias": old["digest"]}, "finished",
                       old.get("previous"))
                return
    _write(output_dir, new, "finished", _previous(old, new))


def reopen_output(output_dir: str | Path, why: str) -> None:
    """Mark the finished result in `output_dir` as being made again under the same config (status "started"; what
    it was kept as "previous", with `why`): a stage that redoes it because something it reads in place changed (a
    corpus edited) must not leave a finished record vouching for files it is replacing."""
    old = read(output_dir)
    if old is not None and old["status"] == "finished":
        record = {k: v for k, v in old.items() if k not in ("content", "alias")}
        _write(Path(output_dir), record, "started", {"digest": _result(old), "changes": [why]})


def write_part(directory: str | Path, fingerprint_: dict, replaces: str | Path | None = None) -> list[str]:
    """Record a finished part (part_fingerprint) in `directory`, e.g. a language built in a hidden directory before
    it is renamed to `replaces`; returns what differs from the record it replaces (empty: nothing, or no record).
    The replaced result is kept as "previous", so a consumer that recorded it is told what changed."""
    old = read(replaces if replaces is not None else directory)
    if old is not None and old["status"] == "finished" and \
            (old["digest"], old["config"]) == (fingerprint_["digest"], fingerprint_["config"]) and \
            replaces is None:
        return []
    _write(Path(directory), fingerprint_, "finished", _previous(old, fingerprint_))
    return differences(old, fingerprint_) if old is not None else []
