"""The whole chain from one TOML (or YAML) file: sections load straight into the stage jobs.

Top-level ``out`` is the run's folder; sections ``[descriptors]``, ``[train]``, ``[fim]``
(optional; ``enabled = false`` skips it), ``[encode]``, ``[evaluate]`` hold the fields of
:class:`~.jobs.DescriptorsJob` and the others; the files between stages are set by the runner,
and relative paths are relative to the config file.

A rerun redoes only what changed: each stage's settings, chained with those of the stages before
it, and the fingerprints of the files of earlier stages it reads (:func:`_inputs`) are recorded in
``OUT/stamps.json`` as the stage starts. A stage whose record matches resumes (descriptors, train,
encode) or is kept when it had finished and its output is there (fim, evaluate); a stage whose record
differs is redone from scratch, and with it every stage after it, except that a larger
``iterations`` alone extends the trained model. The descriptor stage itself redoes the items whose
input files changed (:mod:`.inputs`), which changes its store's fingerprint and so redoes what
follows. ``OUT/config.json`` gets the resolved settings and ``OUT/results.json`` what each stage
reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from .. import distributed
from ..io import atomic_open, file_sha256
from ..store import MANIFEST, Store
from .jobs import JOBS, Job
from .options import JobError, refuse_overlap

# the stages of the chain and the files between them, in the run's folder
RUN_PATHS = {
    "descriptors": {"out": "descriptors"},
    "train": {"descriptors": "descriptors", "out": "model.pt"},
    "fim": {"descriptors": "descriptors", "model": "model.pt", "out": "fim.pt"},
    "encode": {"descriptors": "descriptors", "model": "model.pt", "fim": "fim.pt", "out": "fisher"},
    "evaluate": {"fisher": "fisher", "json": "evaluation.json"},
}
STAGES = tuple(RUN_PATHS)
RESUMABLE = ("descriptors", "train", "encode")
# settings that change how a stage runs, not what it produces
OPERATIONAL = ("overwrite", "extend", "device", "workers", "log_dir", "checkpoint_every", "batch_frames", "flow_cache",
               "compile")


def read_config(path: str | Path) -> dict:
    """The parsed TOML or YAML file (a table of stage sections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    raw = path.read_bytes()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise JobError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or write it as TOML") from None
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise JobError(f"{path}: invalid YAML: {err}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8-sig"))  # a byte-order mark (Windows editors) is no statement
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise JobError(f"{path}: invalid TOML: {err}") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: expected a table of stage sections")
    return data


def plan(path: str | Path, out: str | Path | None = None) -> tuple[Path, list[Job]]:
    """The run's folder and its jobs, in order, from the config file ``path``."""
    path = Path(path)
    cfg = read_config(path)
    base = path.resolve().parent
    unknown = set(cfg) - set(STAGES) - {"out"}
    if unknown:
        raise JobError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (sections: out, {', '.join(STAGES)})")
    folder = Path(out) if out is not None else Path(str(cfg.get("out") or ""))
    if out is None and (not str(folder) or str(folder) == "."):
        raise JobError(f"{path}: set `out = \"folder\"` (top level) or --out")
    if out is None and not folder.is_absolute():
        folder = base / folder
    if "descriptors" not in cfg:
        raise JobError(f"{path}: needs a [descriptors] section (the dataset and the backbone)")
    use_fim = isinstance(cfg.get("fim"), dict) and cfg["fim"].get("enabled", True)
    if not isinstance(use_fim, bool):
        raise JobError(f"{path} [fim]: 'enabled': expected true or false, got {use_fim!r}")
    jobs = []
    for stage in STAGES:
        if stage == "fim" and not use_fim:
            continue
        section = cfg.get(stage) or {}
        if not isinstance(section, dict):
            raise JobError(f"{path}: [{stage}] must be a table")
        section = {k: v for k, v in section.items() if k != "enabled"}
        fixed = {k: str(folder / v) for k, v in RUN_PATHS[stage].items() if k != "fim" or use_fim}
        jobs.append(JOBS[stage].from_section(section, f"{path} [{stage}]", base, fixed))
    return folder, jobs


def _stamp(job: Job, upstream: str) -> tuple[str, dict]:
    settings = {k: v for k, v in job.settings().items() if k not in OPERATIONAL and k not in RUN_PATHS[job.stage]}
    text = json.dumps({"stage": job.stage, "settings": settings, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), settings


def _fingerprint(path: Path) -> str | None:
    """A stage's output: a store's fingerprint, a file's SHA-256; None when it is not there."""
    if (path / MANIFEST).is_file():
        with Store.open(path) as store:
            return store.fingerprint()
    return file_sha256(path) if path.is_file() else None


def _inputs(job: Job, folder: Path) -> dict[str, str | None]:
    """The fingerprints of the outputs of earlier stages that ``job`` reads, by field."""
    return {k: _fingerprint(folder / name) for k, name in RUN_PATHS[job.stage].items()
            if k not in ("out", "json") and getattr(job, k) is not None}


def _outputs_there(job: Job, folder: Path) -> bool:
    return all((folder / name).exists() for k, name in RUN_PATHS[job.stage].items() if k in ("out", "json"))


def _write_json(path: Path, data: dict) -> None:
    if distributed.is_main():
        with atomic_open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
    distributed.barrier()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise JobError(f"{path}: not a JSON file ({err}); delete it to redo the whole run") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: expected a JSON object; delete it to redo the whole run")
    return data


def run_config(path: str | Path, *, out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
               say: Callable[[str], None] = print) -> dict:
    """Run the chain of the config file ``path``; returns {stage: what it reported}. ``overwrite``:
    redo every stage from scratch."""
    t0 = time.perf_counter()
    folder, jobs = plan(path, out)
    for job in jobs:  # the files between stages are the runner's own, inside the folder
        refuse_overlap(folder, "the run's folder (out)",
                       [(f"[{job.stage}] {k}", v) for k, v in job.inputs() if k not in RUN_PATHS[job.stage]])
    folder.mkdir(parents=True, exist_ok=True)
    stamps = {} if overwrite else _read_json(folder / "stamps.json")
    results = _read_json(folder / "results.json")
    _write_json(folder / "config.json", {job.stage: job.settings() for job in jobs})
    upstream, redo_rest = "", overwrite
    for job in jobs:
        stamp, settings = _stamp(job, upstream)
        upstream = stamp
        inputs = _inputs(job, folder)
        before = stamps.get(job.stage) or {}
        # inputs not recorded (stamps of an earlier version) are taken as unchanged
        new_inputs = sorted(k for k, v in inputs.items() if (before.get("inputs") or {}).get(k, v) != v)
        same = not redo_rest and before.get("stamp") == stamp and not new_inputs
        if same and before.get("complete") and job.stage not in RESUMABLE and _outputs_there(job, folder):
            say(f"== {job.stage}: done before with these settings and inputs, kept")
            continue
        changes: set[str] = set()
        if not same and before.get("settings") and not redo_rest:
            old = before["settings"]
            changes = {k for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
        if not same:
            redo_rest = True
            if (changes == {"iterations"} and not new_inputs
                    and settings["iterations"] > before["settings"]["iterations"]):
                job = dataclasses.replace(job, extend=True)
            elif hasattr(job, "overwrite"):
                job = dataclasses.replace(job, overwrite=bool(before) or overwrite)
            changes |= {f"{k} (contents)" for k in new_inputs}
            why = f" (changed: {', '.join(sorted(changes))})" if changes else ""
            say(f"== {job.stage}: {'redone' if before else 'new'}{why}")
        else:
            say(f"== {job.stage}: {'resumed' if not before.get('complete') else 'checked'}")
        stamps[job.stage] = {"stamp": stamp, "settings": settings, "inputs": inputs, "complete": False}
        _write_json(folder / "stamps.json", stamps)
        report = job.run(progress=progress, say=say)
        for line in report.lines():
            say(line)
        results[job.stage] = report.figures()
        stamps[job.stage]["complete"] = True
        _write_json(folder / "stamps.json", stamps)
        _write_json(folder / "results.json", results)
    say(f"run: {', '.join(job.stage for job in jobs)} done in {time.perf_counter() - t0:.1f} s; outputs in {folder}")
    return results
