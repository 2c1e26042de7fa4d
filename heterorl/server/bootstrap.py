"""What a learner loads before it can serve: model and tokenizer, the task and its reward, the files samplers need.

Nothing here touches the run directory or the run database (`heterorl.server.resume` does); loading is the
same for a fresh run and a resumed one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from heterorl.common import model as model_lib
from heterorl.common.tasks import Problem, Task, make_task
from heterorl.server.config import LearnerConfig

logger = logging.getLogger(__name__)

MODEL_FILE_LIMIT = 32 << 20  # architecture/tokenizer files shipped to samplers; weights never go this way
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@dataclass
class RunInputs:
    """The loaded model, tokenizer and task of a run, and what samplers are sent about them."""

    model_dir: Path
    tokenizer: object
    model: torch.nn.Module
    vocab_size: int
    pad_id: int
    model_files: dict[str, bytes]  # name -> bytes: config and tokenizer files, never weights
    task: Task
    reward_name: str
    eval_problems: list[Problem]
    sampler_task_options: str  # JSON of the task's options if samplers may rebuild it to score locally, else ""
    system_prompt: str | None = None  # put before every question, in the model's chat template

    def encode(self, problem: Problem) -> list[int]:
        return chat_prompt_ids(self.tokenizer, problem.question, self.system_prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def load(config: LearnerConfig) -> RunInputs:
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    model_dir = model_lib.resolve_model(config.run.model)
    tokenizer = model_lib.load_tokenizer(model_dir)
    model = model_lib.load_causal_lm(model_dir, dtype=torch.float32)
    task = make_task(config.run.task, **{"seed": config.run.seed, **config.task_kwargs()})
    reward_spec = config.run.reward_spec(task.default_reward)
    held_out = task.eval_problems()
    if config.eval.eval_size > len(held_out):
        logger.warning("eval_size %d > %d held-out problems of the task; using all of them",
                       config.eval.eval_size, len(held_out))
    # Samplers may rebuild the task to score their own completions only if its questions verify themselves.
    probe = task.train_problem(0).question
    system_prompt = config.data.system_prompt
    try:
        chat_prompt_ids(tokenizer, probe, system_prompt)
    except Exception as err:  # noqa: BLE001 - a template that refuses a system message (or any prompt) stops here
        raise ValueError(f"the model's chat template cannot format this task's prompts"
                         f"{' with a system prompt' if system_prompt else ''}: {err}") from None
    return RunInputs(
        model_dir=model_dir,
        tokenizer=tokenizer,
        model=model,
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        pad_id=pad_id(tokenizer),
        model_files=read_model_files(model_dir),
        task=task,
        reward_name=reward_spec.name,
        eval_problems=held_out[: config.eval.eval_size],
        sampler_task_options=json.dumps(task.options()) if task.local_reference(probe) is not None else "",
        system_prompt=system_prompt,
    )


def chat_prompt_ids(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the question in the model's own chat template, after an optional system message, ending where
    the assistant's answer begins (without a system prompt: exactly `model.encode_prompt`)."""
    if system_prompt is None:
        return model_lib.encode_prompt(tokenizer, question)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def read_model_files(model_dir: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name.startswith("."):
            continue
        if path.stat().st_size > MODEL_FILE_LIMIT:
            continue
        files[path.name] = path.read_bytes()
    if "config.json" not in files:
        raise ValueError(f"model directory {model_dir} has no config.json")
    return files
