"""Train-state checkpoints, written atomically, and the settings a resumed run may and may not change.

A checkpoint of step s is the directory RUN_DIR/train_state/step-<s>/ holding what the optimizer side needs to
continue bit for bit: `model.safetensors` (fp32 master weights), `optimizer.pt` (AdamW moments and step counts),
`rng.pt` (torch and Python RNG states) and `meta.json` (step, version, run id). Everything else a resume needs
(leases, pending groups, the sampler registry, version numbers) is in the run database, which also records which
directory is the current checkpoint; `heterorl.server.resume` puts the two together.

Writing: files go into `step-<s>.tmp/`, each is fsynced, the directory is fsynced and renamed to `step-<s>/`,
and the parent is fsynced; only then does the learner record the checkpoint (with a manifest of sizes and CRC32s
of its files) in the database, and only after that commit are older directories removed. A crash at any point
leaves either the old checkpoint recorded and intact, or the new one; `remove_others` clears the leftovers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model


TRAIN_STATE_DIR = "train_state"
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "meta.json")


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
                      meta: dict[str, Any]) -> tuple[Path, dict[str, dict[str, int]]]:
    """Write the checkpoint of `step` under `root` atomically; returns (directory, manifest)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if final.exists():
        raise FileExistsError(f"{final} exists; a checkpoint of step {step} was already written")
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    manifest = {}
    for name in FILES:
        _fsync(tmp / name)
        manifest[name] = {"bytes": (tmp / name).stat().st_size, "crc32": _crc32(tmp / name)}
    _fsync(tmp)
    tmp.rename(final)
    _fsync(root)
    return final, manifest


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
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Verify the checkpoint, load weights, optimizer state and RNG states into place; returns its meta."""
    verify(path, manifest)
    missing, unexpected = load_model(model, path / "model.safetensors", strict=True)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "meta.json").read_text())


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


def export_model(run_dir: Path, model: torch.nn.Module, tokenizer) -> Path:
    """The trained weights as a Hugging Face directory RUN_DIR/checkpoint, usable as `--model` of a later run.

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
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
