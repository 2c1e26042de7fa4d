"""`heterorl export RUN_DIR [--version N] OUT_DIR`: a run's weights as a Hugging Face model directory.

What is exported is exactly what samplers were sent for that version: the bf16 cast of the learner's fp32 master
weights (`Trainer.snapshot()`), written with `save_pretrained` beside the run's config, tokenizer and generation
config, so `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` (or vLLM) loads it. Before anything is
written, the weights' `codec.digest` (the hash the learner published for the version and recorded in the run
database's `versions` table) is checked against the record, and after writing, the directory is loaded back
and hashed again; `OUT_DIR/heterorl_export.json` records run id, version, step and digest.

Versions are held in memory only by the learner, so an export reads what is on disk:

- `RUN_DIR/train_state/step-*/` (`--checkpoint-every`, the end of the run, SIGTERM): the train-state checkpoint
  recorded in the `checkpoints` table, verified against its manifest; it names its version.
- `RUN_DIR/checkpoint/`: the fp32 weights the learner wrote at the end of its run; its version is the published
  one whose digest its bf16 cast has.

Without `--version`, the newest of these is exported. The architecture and tokenizer come from
`RUN_DIR/checkpoint/` when present, else from the run's `--model` (the model cache for `tiny`/`smollm2-135m`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPORT_RECORD = "heterorl_export.json"


class ExportError(ValueError):
    """A run or version that cannot be exported; the message names the cause and the fix (one line)."""


@dataclass(frozen=True)
class TrainState:
    step: int
    version: int
    weights_sha256: str
    path: Path
    manifest: dict[str, dict[str, int]]


@dataclass
class RunRecord:
    run_dir: Path
    run_id: str
    config: dict[str, Any]
    versions: dict[int, str]        # every published version -> weights digest
    train_states: list[TrainState]  # recorded checkpoints whose directory is still on disk, oldest first

    @property
    def final_dir(self) -> Path | None:
        path = self.run_dir / "checkpoint"
        return path if (path / "config.json").is_file() else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_run(run_dir: Path) -> RunRecord:
    from heterorl.server.checkpoint import TRAIN_STATE_DIR
    from heterorl.server.db import DB_NAME, read_only_query

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory: pass the learner's --run-dir")
    if not (run_dir / DB_NAME).is_file():
        raise ExportError(f"{run_dir} has no {DB_NAME}: it is not a learner's run directory (or its learner predates "
                          f"the run database); pass the --run-dir a learner wrote")
    try:
        meta = dict(read_only_query(run_dir, "SELECT key, value FROM run"))
        versions = dict(read_only_query(run_dir, "SELECT version, weights_sha256 FROM versions"))
        rows = read_only_query(run_dir, "SELECT step, version, weights_sha256, path, manifest FROM checkpoints "
                                        "ORDER BY step")
    except Exception as err:  # sqlite3.Error, or a database of another schema
        raise ExportError(f"cannot read the run database {run_dir / DB_NAME}: {err}; check that the file is a "
                          f"heterorl run database and readable") from None
    states = []
    for step, version, digest, rel, manifest in rows:
        path = run_dir / rel
        if path.is_dir() and path.parent.name == TRAIN_STATE_DIR:
            states.append(TrainState(step, version, digest, path, json.loads(manifest)))
    return RunRecord(run_dir, meta.get("run_id", "?"), json.loads(meta.get("config", "{}")), versions, states)


def _find_setting(config: dict[str, Any], key: str) -> Any:
    """A setting of the stored learner config, flat (`{"model": ...}`) or in sections (`{"run": {"model": ...}}`)."""
    if key in config and not isinstance(config[key], dict):
        return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = _find_setting(value, key)
            if found is not None:
                return found
    return None


def model_source(run: RunRecord) -> Path:
    """The directory to take the architecture, tokenizer and generation config from."""
    if run.final_dir is not None:
        return run.final_dir
    from heterorl.common.model import resolve_model

    spec = _find_setting(run.config, "model")
    if not spec:
        raise ExportError(f"the run database of {run.run_dir} does not name the run's model and there is no "
                          f"{run.run_dir / 'checkpoint'}; cannot tell the architecture")
    try:
        return resolve_model(str(spec))
    except (ValueError, OSError) as err:
        raise ExportError(f"the run's model {spec!r} is not available here ({err}); export on the learner's "
                          f"machine, or after the run has ended (it writes {run.run_dir / 'checkpoint'})") from None


def _bf16_digest(model, like: str | None = None) -> str:
    import torch

    from heterorl.common import codec
    from heterorl.common.weights import weight_tensors

    # Trainer.snapshot(): each parameter (tied ones once) cast to bf16, then codec.digest, as loop.publish() does.
    # `like`: a recorded digest, whose algorithm (blake3, or the legacy sha256 of older runs) is used.
    return codec.digest({name: t.detach().to(torch.bfloat16).contiguous() for name, t in weight_tensors(model).items()},
                        like=like)


def _load_fp32(model_dir: Path):
    import torch

    from heterorl.common.model import load_causal_lm

    return load_causal_lm(model_dir, dtype=torch.float32)


def _load_train_state(source: Path, state: TrainState):
    from heterorl.server.checkpoint import CheckpointError, read_weights, verify

    try:
        verify(state.path, state.manifest)
    except CheckpointError as err:
        raise ExportError(f"{err}; the learner may be replacing it right now: export again, or pick another "
                          f"--version") from None
    model = _load_fp32(source)
    try:
        missing, unexpected = model.load_state_dict(read_weights(state.path), strict=False)  # either format
    except (OSError, CheckpointError) as err:
        raise ExportError(f"cannot read the weights of {state.path} ({err}); the learner may have replaced "
                          f"that checkpoint with a newer one: export again") from None
    if missing or unexpected:
        raise ExportError(f"{state.path} does not fit the model of {source} (missing {missing}, unexpected "
                          f"{unexpected}); export from the run's own directory")
    return model


def _versions_on_disk(run: RunRecord, final_version: int | None) -> str:
    where: dict[int, list[str]] = {}
    for s in run.train_states:
        where.setdefault(s.version, []).append(f"train_state step {s.step}")
    if final_version is not None:
        where.setdefault(final_version, []).append("the final checkpoint/")
    return ", ".join(f"version {v} ({' and '.join(w)})" for v, w in sorted(where.items())) or "none"


def _final_version(run: RunRecord, model) -> int | None:
    """The newest version whose recorded digest the model's bf16 weights hash to (each algorithm computed once)."""
    from heterorl.common import codec

    computed: dict[str, str] = {}
    matches = []
    for v, d in run.versions.items():
        algorithm = codec.digest_algorithm(d)
        if algorithm not in computed:
            computed[algorithm] = _bf16_digest(model, like=d)
        if computed[algorithm] == d:
            matches.append(v)
    return max(matches) if matches else None


def export(run_dir: Path, out_dir: Path, version: int | None = None) -> dict[str, Any]:
    """Write the HF directory of `version` (default: the newest on disk) to `out_dir`; returns what was written."""
    import torch

    from heterorl.common.progress import activity

    run = read_run(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory: pass a new OUT_DIR or remove it first")
    if version is not None and version not in run.versions:
        published = f"1..{max(run.versions)}" if run.versions else "none yet"
        raise ExportError(f"version {version} was never published by the run in {run.run_dir} (published: "
                          f"{published}); pick a published version")
    newest_state = max(run.train_states, key=lambda s: s.version, default=None)
    wanted_state = next((s for s in run.train_states if s.version == version), None) if version else None

    source_dir = model_source(run)
    model, origin, final_version = None, "", None
    if wanted_state is None and run.final_dir is not None and (
            version is not None or newest_state is None or
            run.versions and newest_state.version < max(run.versions)):
        # The final checkpoint is needed (asked-for version not in train_state, or possibly newer than it).
        _log(f"loading {run.final_dir} ...")
        model = _load_fp32(run.final_dir)
        final_version = _final_version(run, model)
        if version is None and final_version is not None and (newest_state is None or
                                                               final_version >= newest_state.version):
            version, origin = final_version, str(run.final_dir)
        elif version is not None and final_version == version:
            origin = str(run.final_dir)
        else:
            model = None
    if model is None:
        state = wanted_state or (newest_state if version is None else None)
        if state is None:
            if version is None:
                raise ExportError(f"{run.run_dir} holds no weights to export: no train-state checkpoint is on disk "
                                  f"and no final checkpoint/ matches a published version; run the learner with "
                                  f"--checkpoint-every N, or let it finish")
            raise ExportError(f"version {version} is not on disk in {run.run_dir} (versions live in the learner's "
                              f"memory; on disk: {_versions_on_disk(run, final_version)}); export one of those (only the "
                              f"newest train-state checkpoint is kept: export a version while it is the newest)")
        _log(f"loading {state.path} (step {state.step}, version {state.version}) ...")
        model = _load_train_state(source_dir, state)
        version, origin = state.version, str(state.path)

    recorded = run.versions.get(version)
    digest = _bf16_digest(model, like=recorded)
    if digest != recorded:
        raise ExportError(f"the weights in {origin} hash to {digest[:16]}..., but version {version} was published as "
                          f"{(recorded or '?')[:16]}...: the files are not that version's; export another version")
    step = next((s.step for s in run.train_states if s.version == version), None)

    _log(f"writing version {version} (bf16) to {out_dir} ...")
    started = time.perf_counter()
    model = model.to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with activity(f"writing version {version}"):  # a bar on a terminal; a line every 15 s when piped
            _write_dir(model, source_dir, tmp)
        record = {
            "run_id": run.run_id, "run_dir": str(run.run_dir.resolve()), "version": version, "step": step,
            "weights_sha256": digest, "dtype": "bfloat16", "source": origin, "exported_at": time.time(),
        }
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        # Read back what was written: the files themselves must hash to the version's digest.
        reloaded = _bf16_digest(_load_fp32(tmp), like=digest)
        if reloaded != digest:
            raise ExportError(f"the written files hash to {reloaded[:16]}..., not {digest[:16]}...: the model's "
                              f"save_pretrained changed the weights; report this with the model's architecture")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["seconds"] = time.perf_counter() - started
    return record


def _write_dir(model, source_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig

    from heterorl.common.model import load_tokenizer

    tokenizer = load_tokenizer(source_dir)  # the learner's tokenizer: pad token set as in training
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)


# ---- command line -----------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from heterorl.common.progress import quiet_library_bars

    quiet_library_bars()
    try:
        record = export(args.run_dir, args.out_dir, args.version)
    except ExportError as err:
        print(f"heterorl export: {err}", file=sys.stderr)
        return 2
    step = f", step {record['step']}" if record["step"] is not None else ""
    print(f"exported version {record['version']}{step} of run {record['run_id']} to {args.out_dir} "
          f"(bf16, weights sha256 {record['weights_sha256']}, the published digest) in {record['seconds']:.1f}s")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `export` to the `heterorl` command's subcommands."""
    p = sub.add_parser("export", help="write a run's weights (final, or a version on disk) as a Hugging Face "
                                      "model directory")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the learner's --run-dir")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new directory to write the model to")
    p.add_argument("--version", type=int, default=None,
                   help="published version to export (default: the newest on disk); it must be on disk: a "
                        "train-state checkpoint or the final checkpoint/")
    p.set_defaults(func=cmd_export)
