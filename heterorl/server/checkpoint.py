"""Train-state checkpoints, written atomically, and the settings a resumed run may and may not change.

A checkpoint of step s is the directory RUN_DIR/train_state/step-<s>/ holding what the optimizer side needs to
continue bit for bit: `dcp/`, a distributed checkpoint (torch.distributed.checkpoint) of the fp32 master weights
and the AdamW moments and step counts, written by every rank of the learner (each its own shards; one rank writes
it all), `rng.pt` (torch and Python RNG states of rank 0) and `meta.json` (step, version, run id). A distributed
checkpoint is resharded on load, so a run written by N ranks resumes on any number of ranks (on several hosts
RUN_DIR must be shared storage). Everything else a resume needs (leases, pending groups, the sampler registry,
version numbers) is in the run database, which also records which directory is the current checkpoint;
`heterorl.server.resume` puts the two together. Checkpoints of the earlier format (`model.safetensors` +
`optimizer.pt`) still load on a single-rank learner and are refused by name on several ranks.

Writing: files go into `step-<s>.tmp/`, each is fsynced, the directories are fsynced and `step-<s>.tmp/` is renamed
to `step-<s>/`, and the parent is fsynced; only then does the learner record the checkpoint (with a manifest of
sizes and CRC32s of its files) in the database, and only after that commit are older directories removed. A crash
at any point leaves either the old checkpoint recorded and intact, or the new one; `remove_others` clears the
leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model

if TYPE_CHECKING:
    from heterorl.server.distributed import Ranks

TRAIN_STATE_DIR = "train_state"
DCP_DIR = "dcp"  # the distributed checkpoint of weights and optimizer inside a step directory
LEGACY_WEIGHTS = "model.safetensors"  # the single-process format before distributed checkpoints


class CheckpointError(ValueError):
    """A recorded checkpoint is missing or does not match what the database says was written."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def write_train_state(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      meta: dict[str, Any], ranks: Ranks | None = None
                      ) -> tuple[Path | None, dict[str, dict[str, int]] | None]:
    """Write the checkpoint of `step` under `root` atomically; returns (directory, manifest), (None, None) on ranks
    other than 0. With `ranks`, collective: rank 0 calls it and announces it, the others join from `follow`."""
    leader = ranks is None or ranks.leader
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if leader:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise FileExistsError(f"{final} exists; a checkpoint of step {step} was already written")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if ranks is not None:
            ranks.announce("save", (root, step, {}))
    _save_dcp(model, optimizer, tmp / DCP_DIR, ranks)
    if not leader:
        return None, None
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    manifest = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(file)
        manifest[file.relative_to(tmp).as_posix()] = {"bytes": file.stat().st_size, "crc32": _crc32(file)}
    _fsync(tmp / DCP_DIR)
    _fsync(tmp)
    tmp.rename(final)
    _fsync(root)
    return final, manifest


def _save_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, ranks: Ranks | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet(ranks):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path), no_dist=ranks is None)


@contextlib.contextmanager
def _single_process_quiet(ranks: Ranks | None) -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group; on one rank that is the intent."""
    with warnings.catch_warnings():
        if ranks is None:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def verify(path: Path, manifest: dict[str, dict[str, int]]) -> None:
    """CheckpointError unless every file of the manifest is there with its size and CRC32."""
    if not path.is_dir():
        raise CheckpointError(f"the recorded checkpoint {path} does not exist")
    for name, want in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size, crc = file.stat().st_size, _crc32(file)
        if size != want["bytes"] or crc != want["crc32"]:
            raise CheckpointError(
                f"checkpoint file {file} is damaged: {size} bytes crc32 {crc:08x}, "
                f"recorded {want['bytes']} bytes crc32 {want['crc32']:08x}"
            )


def read_train_state(path: Path, manifest: dict[str, dict[str, int]], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, ranks: Ranks | None = None) -> dict[str, Any]:
    """Verify the checkpoint, load weights, optimizer state and RNG states into place; returns its meta ({} on
    ranks other than 0). With `ranks`, collective like `write_train_state`; rank 0 verifies before anyone loads."""
    leader = ranks is None or ranks.leader
    if leader:
        verify(path, manifest)
        if LEGACY_WEIGHTS in manifest:
            if ranks is not None:
                raise CheckpointError(
                    f"{path} is a checkpoint of the single-process format ({LEGACY_WEIGHTS} + optimizer.pt), which "
                    f"a learner of {ranks.world} ranks cannot reshard; resume it once on one rank (without "
                    f"torchrun or --nproc) until it writes a checkpoint, then continue on {ranks.world} ranks")
            _read_legacy(path, model, optimizer)
        if ranks is not None:
            ranks.announce("load", (path, manifest))
    if LEGACY_WEIGHTS not in manifest:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _single_process_quiet(ranks):
            dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=ranks is None)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if not leader:
        return {}
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "meta.json").read_text())


def _read_legacy(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    missing, unexpected = load_model(model, path / LEGACY_WEIGHTS, strict=True)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint directory (either format), whole, on the CPU, by parameter name,
    without a process group: for export and inspection."""
    if (path / LEGACY_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(path / LEGACY_WEIGHTS))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    except OSError as err:
        raise CheckpointError(f"{path} holds no readable checkpoint ({err})") from None
    state = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
             for key, md in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    with _single_process_quiet(None):
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}


def remove_others(root: Path, keep: Path | None) -> list[str]:
    """Delete every entry of `root` except `keep` (older checkpoints, unfinished or unrecorded ones)."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if keep is not None and entry.name == keep.name:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def export_model(run_dir: Path, model: torch.nn.Module, tokenizer,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The trained weights as a Hugging Face directory RUN_DIR/checkpoint, usable as `--model` of a later run.

    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered on rank 0).
    The previous directory is moved aside before the new one takes its name, so a crash leaves one of them.
    """
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():  # left by a crash between the two renames below
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
