"""The weight codec: exact round trips, in-place application, chains, validation of bad payloads, the hash."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heterorl.common import codec

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DENSITIES = ["none", "sparse", "ulp", "dense", "complete"]
SMALL_BLOCK = 256  # tiny blocks make small tensors span several sparse blocks
INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so comparisons are exact (NaN, -0.0 and all)."""
    return t.contiguous().view(INT_OF[t.element_size()])


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(bits(g), bits(w)), name


def random_tensor(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def perturb(gen: torch.Generator, t: torch.Tensor, density: str) -> torch.Tensor:
    """A new version of `t`: its bit patterns changed in the given pattern (always a valid bit pattern)."""
    out = t.clone()
    flat = bits(out).reshape(-1)
    n = flat.numel()
    if n == 0 or density == "none":
        return out
    if density == "complete":
        return random_tensor(gen, tuple(t.shape), t.dtype)
    p = {"sparse": 0.04, "ulp": 0.1, "dense": 0.6}[density]
    mask = torch.rand(n, generator=gen) < p
    k = int(mask.sum())
    if density == "ulp":
        step = torch.randint(0, 2, (k,), generator=gen, dtype=flat.dtype) * 2 - 1
    else:  # mostly +-1 like an optimizer step, some larger moves and sign flips
        step = torch.randint(-300, 301, (k,), generator=gen).to(flat.dtype)
        step[torch.rand(k, generator=gen) < 0.7] = 1
    flat[mask] += step
    return out


@st.composite
def version_pair(draw, n_versions: int = 2):
    """A few tensors of random shapes and dtypes, and n_versions successive versions of them."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n_tensors = draw(st.integers(1, 4))
    specs = []
    for i in range(n_tensors):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 24 if ndim > 1 else 1500), min_size=ndim, max_size=ndim)))
        specs.append((f"layer.{i}.weight", shape, draw(st.sampled_from(DTYPES))))
    versions = [{name: random_tensor(gen, shape, dt) for name, shape, dt in specs}]
    for _ in range(n_versions - 1):
        versions.append({name: perturb(gen, t, draw(st.sampled_from(DENSITIES))) for name, t in versions[-1].items()})
    return versions


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(version_pair())
def test_delta_round_trip_is_bit_exact(versions):
    v0, v1 = versions
    payload = codec.encode(v1, v0, block=SMALL_BLOCK)
    assert_same(codec.decode(payload, v0), v1)
    target = {k: v.clone() for k, v in v0.items()}
    codec.apply_(payload, target)
    assert_same(target, v1)
    assert codec.digest(target) == codec.digest(v1)


@FAST
@given(version_pair(), st.sampled_from([codec.SPARSE, codec.XOR, codec.XOR_PLANES, codec.RAW, codec.PLANES]))
def test_every_method_alone_is_exact(versions, method):
    v0, v1 = versions
    payload = codec.encode(v1, v0, methods=[method], block=SMALL_BLOCK, threads=1)
    assert {info.method for info in codec.inspect(payload).tensors.values()} == {method}
    assert_same(codec.decode(payload, v0), v1)


@settings(max_examples=30, deadline=None)
@given(version_pair(n_versions=3))
def test_chains_compose(versions):
    v0, v1, v2 = versions
    step_by_step = {k: v.clone() for k, v in v0.items()}
    codec.apply_(codec.encode(v1, v0, block=SMALL_BLOCK), step_by_step)
    codec.apply_(codec.encode(v2, v1, block=SMALL_BLOCK), step_by_step)
    combined = {k: v.clone() for k, v in v0.items()}
    codec.apply_(codec.encode(v2, v0, block=SMALL_BLOCK), combined)
    assert_same(step_by_step, v2)
    assert_same(combined, v2)


@settings(max_examples=30, deadline=None)
@given(version_pair(n_versions=1))
def test_anchor_round_trip(versions):
    (v0,) = versions
    payload = codec.encode(v0, None)
    assert codec.inspect(payload).kind == codec.KIND_ANCHOR
    assert_same(codec.decode(payload, None), v0)
    target = {k: torch.zeros_like(v) for k, v in v0.items()}
    codec.apply_(payload, target)
    assert_same(target, v0)


def test_special_values_and_shapes_are_exact():
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5, 65504.0])
    for dt in DTYPES:
        v0 = {"special": special.to(dt), "scalar": torch.tensor(1.5, dtype=dt), "empty": torch.empty(0, 3, dtype=dt),
              "big": torch.randn(3 * SMALL_BLOCK + 7).to(dt)}
        v1 = {"special": special.flip(0).to(dt), "scalar": torch.tensor(-2.0, dtype=dt),
              "empty": torch.empty(0, 3, dtype=dt), "big": v0["big"].clone()}
        bits(v1["big"]).view(-1)[::97] += 1  # gaps over the 84-element cap: the long-gap stream
        for payload in (codec.encode(v1, v0, block=SMALL_BLOCK), codec.encode(v1, v0)):
            assert_same(codec.decode(payload, v0), v1)
        unchanged = codec.encode(v0, v0)
        assert codec.inspect(unchanged).method_counts() == {codec.SAME: 4}
        assert_same(codec.decode(unchanged, v0), v0)


def test_sparse_chosen_for_optimizer_like_step_and_smaller_than_xor():
    gen = torch.Generator().manual_seed(1)
    v0 = {"w": random_tensor(gen, (512, 512), torch.bfloat16)}
    v1 = {"w": perturb(gen, v0["w"], "ulp")}
    chosen = codec.encode(v1, v0)
    assert codec.inspect(chosen).tensors["w"].method == codec.SPARSE
    assert len(chosen) < len(codec.encode(v1, v0, methods=[codec.XOR]))
    assert len(chosen) < len(codec.encode(v1, v0, methods=[codec.XOR_PLANES]))


def test_multi_block_tensor_with_default_block():
    gen = torch.Generator().manual_seed(2)
    v0 = {"w": random_tensor(gen, (codec.BLOCK + 4099,), torch.bfloat16)}
    v1 = {"w": perturb(gen, v0["w"], "sparse")}
    payload = codec.encode(v1, v0)
    assert codec.inspect(payload).tensors["w"].method == codec.SPARSE
    target = {"w": v0["w"].clone()}
    codec.apply_(payload, target)
    assert_same(target, v1)


def test_apply_into_fp32_upcast_and_non_contiguous_targets():
    gen = torch.Generator().manual_seed(3)
    v0 = {"a": random_tensor(gen, (40, 30), torch.bfloat16), "b": random_tensor(gen, (700,), torch.float16)}
    v1 = {name: perturb(gen, t, "sparse") for name, t in v0.items()}
    payload = codec.encode(v1, v0, block=SMALL_BLOCK)

    upcast = {name: t.float() for name, t in v0.items()}
    codec.apply_(payload, upcast)
    for name, t in v1.items():
        assert upcast[name].dtype == torch.float32
        assert torch.equal(upcast[name], t.float())
    assert codec.digest(upcast, dtype=None) != codec.digest(v1)
    assert codec.digest({"a": upcast["a"]}, dtype=torch.bfloat16) == codec.digest({"a": v1["a"]})

    storage = v0["a"].t().contiguous()  # (30, 40); its transpose is a non-contiguous (40, 30) view
    target = {"a": storage.t(), "b": v0["b"].clone()}
    assert not target["a"].is_contiguous()
    codec.apply_(payload, target)
    assert_same({k: v.contiguous() for k, v in target.items()}, v1)
    assert torch.equal(bits(storage.t()), bits(v1["a"]))  # the caller's storage itself changed


def test_narrower_or_integer_target_rejected():
    v0 = {"w": torch.randn(10).float()}
    v1 = {"w": v0["w"] + 1}
    payload = codec.encode(v1, v0)
    with pytest.raises(ValueError, match="dtype"):
        codec.apply_(payload, {"w": v0["w"].to(torch.bfloat16)})
    with pytest.raises(ValueError, match="dtype"):
        codec.decode(payload, {"w": v0["w"].double()})  # decode wants the exact base, no widening


def _pair():
    gen = torch.Generator().manual_seed(4)
    v0 = {"a": random_tensor(gen, (64, 8), torch.bfloat16), "b": random_tensor(gen, (300,), torch.bfloat16)}
    v1 = {name: perturb(gen, t, "sparse") for name, t in v0.items()}
    return v0, v1


def test_mismatched_base_rejected_before_any_change():
    v0, v1 = _pair()
    payload = codec.encode(v1, v0)
    with pytest.raises(ValueError, match="only in payload"):
        codec.decode(payload, {"a": v0["a"]})
    with pytest.raises(ValueError, match="only in base"):
        codec.decode(payload, {**v0, "c": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        codec.decode(payload, {"a": v0["a"].reshape(8, 64), "b": v0["b"]})
    with pytest.raises(ValueError, match="dtype"):
        codec.decode(payload, {"a": v0["a"].half(), "b": v0["b"]})
    with pytest.raises(ValueError, match="needs the base"):
        codec.decode(payload, None)
    target = {"a": v0["a"].clone(), "b": torch.zeros(301, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="shape"):
        codec.apply_(payload, target)
    assert torch.equal(bits(target["a"]), bits(v0["a"]))  # nothing was half-applied
    with pytest.raises(ValueError, match="same"):
        codec.encode(v1, {"a": v0["a"], "b": v0["b"][:10]})
    with pytest.raises(ValueError, match="unknown methods"):
        codec.encode(v1, v0, methods=["gzip"])
    with pytest.raises(ValueError, match="none of the methods"):
        codec.encode(v1, None, methods=[codec.SPARSE])
    with pytest.raises(ValueError, match="no allowed method"):
        codec.encode(v1, v0, methods=[codec.SAME])


def test_truncated_and_garbage_payloads_rejected():
    v0, v1 = _pair()
    payload = codec.encode(v1, v0)
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(0, len(payload), 25).tolist()) | {0, 1, 5, len(payload) - 1}):
        with pytest.raises(ValueError):
            codec.decode(payload[:cut], v0)
    for pos in rng.integers(0, len(payload), 25).tolist():
        corrupt = bytearray(payload)
        corrupt[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(ValueError):
            codec.decode(bytes(corrupt), v0)
    with pytest.raises(ValueError, match="not a zstd frame"):
        codec.decode(b"definitely not a payload", v0)
    with pytest.raises(ValueError):
        codec.decode(payload + b"trailing", v0)
    # a well-formed zstd frame holding something else entirely
    with pytest.raises(ValueError, match="header"):
        codec.decode(zstandard.ZstdCompressor(write_checksum=True).compress(b"\x05" * 64), v0)
    with pytest.raises(ValueError, match="checksum"):
        codec.decode(zstandard.ZstdCompressor(write_checksum=False).compress(b"\x05" * 64), v0)


def _rewrite(payload: bytes, edit) -> bytes:
    """Decompress, let `edit` change the heterorl metadata, recompress: a well-formed but lying payload."""
    raw = zstandard.ZstdDecompressor().decompress(payload)
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    meta = json.loads(header["__metadata__"]["heterorl"])
    edit(meta)
    header["__metadata__"]["heterorl"] = json.dumps(meta)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    body = raw[8 + hlen :]
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(
        struct.pack("<Q", len(head)) + head + body)


def test_lying_metadata_rejected():
    v0, v1 = _pair()
    payload = codec.encode(v1, v0, block=SMALL_BLOCK, methods=[codec.SPARSE])
    assert_same(codec.decode(_rewrite(payload, lambda m: None), v0), v1)  # the rewrite itself is faithful

    def set_method(m):
        m["tensors"]["a"]["method"] = "bogus"

    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        codec.decode(_rewrite(payload, set_method), v0)

    def set_format(m):
        m["format"] = "heterorl-codec/99"

    with pytest.raises(ValueError, match="format"):
        codec.decode(_rewrite(payload, set_format), v0)

    def grow_block(m):
        m["block"] = SMALL_BLOCK * 2  # the index no longer has one entry per block

    with pytest.raises(ValueError, match="sparse index"):
        codec.decode(_rewrite(payload, grow_block), v0)

    def make_anchor(m):
        m["kind"] = codec.KIND_ANCHOR  # an anchor may not carry delta methods

    with pytest.raises(ValueError, match="unknown method"):
        codec.decode(_rewrite(payload, make_anchor), None)

    def lie_dtype(m):
        m["tensors"]["b"]["dtype"] = "float16"

    target = {k: v.clone() for k, v in v0.items()}
    with pytest.raises(ValueError, match="dtype"):
        codec.apply_(_rewrite(payload, lie_dtype), target)
    assert_same(target, v0)


def test_container_is_safetensors():
    v0, v1 = _pair()
    raw = zstandard.ZstdDecompressor().decompress(codec.encode(v1, v0))
    loaded = safetensors.torch.load(raw)
    assert loaded and all(name.split("::")[0] in v0 for name in loaded)
    anchor = safetensors.torch.load(zstandard.ZstdDecompressor().decompress(codec.encode(v1, None)))
    assert {name.split("::")[0] for name in anchor} == set(v1)


def test_digest_stable_and_sensitive():
    v0, _ = _pair()
    d = codec.digest(v0)
    assert d.startswith("blake3:") and len(d) == 7 + 64 and d == codec.digest(dict(reversed(list(v0.items()))))
    assert d == codec.digest({k: v.clone() for k, v in v0.items()})
    flipped = {k: v.clone() for k, v in v0.items()}
    bits(flipped["b"])[7] ^= 1
    assert codec.digest(flipped) != d
    assert codec.digest({"A": v0["a"], "b": v0["b"]}) != d  # name
    assert codec.digest({"a": v0["a"].reshape(8, 64), "b": v0["b"]}) != d  # shape, same bytes
    assert codec.digest({"a": bits(v0["a"]), "b": v0["b"]}) != d  # dtype, same bytes
    assert codec.digest({k: v.float() for k, v in v0.items()}, dtype=torch.bfloat16) == d
    assert codec.digest({"x": torch.empty(0)}) != codec.digest({"x": torch.empty(0, 1)})


def test_threads_and_level_do_not_change_content():
    v0, v1 = _pair()
    for threads in (0, 1, 2):
        for level in (1, 3, 9):
            payload = codec.encode(v1, v0, threads=threads, level=level)
            assert_same(codec.decode(payload, v0, threads=max(1, threads)), v1)
    with pytest.raises(ValueError, match="block"):
        codec.encode(v1, v0, block=1000)


def test_memoryview_payload_accepted():
    v0, v1 = _pair()
    payload = codec.encode(v1, v0)
    buf = io.BytesIO(b"xx" + payload)
    assert_same(codec.decode(buf.getbuffer()[2:], v0), v1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_other_dtypes_every_method(dtype):
    gen = torch.Generator().manual_seed(5)
    v0 = {"x": (torch.randn(3000, generator=gen) * 100).to(dtype), "y": torch.zeros(3, dtype=dtype)}
    v1 = {"x": v0["x"].clone(), "y": torch.ones(3, dtype=dtype)}
    v1["x"][::7] += 1
    for methods in (None, [codec.SPARSE], [codec.XOR], [codec.XOR_PLANES], [codec.RAW], [codec.PLANES]):
        assert_same(codec.decode(codec.encode(v1, v0, methods=methods, block=SMALL_BLOCK), v0), v1)
    with pytest.raises(ValueError, match="unsupported dtype"):
        codec.encode({"b": torch.zeros(2, dtype=torch.bool)}, None)


def test_long_gaps_at_the_cap_and_beyond_every_plane():
    """Gaps of 83, 84 and 85 (around the cap), one past 2**16 and one past 2**24 (the long stream's upper byte
    planes), changes on the first and last element, in one block and split over several."""
    n = (1 << 24) + 300
    v0 = {"w": torch.zeros(n, dtype=torch.bfloat16)}
    v1 = {"w": v0["w"].clone()}
    at = [0, 84, 169, 255, 255 + 70000, n - 201, n - 1]  # gaps: 83, 84, 85, 69999, ~2**24, 199
    flat = bits(v1["w"]).view(-1)
    flat[at] += torch.tensor([1, -1, 1, 7, -1, 1, -300], dtype=torch.int16)
    far = sum(1 for a, b in zip([-1] + at, at) if b - a - 1 >= 84)
    payload = codec.encode(v1, v0, block=1 << 25)
    info = codec.inspect(payload).tensors["w"]
    assert info.method == codec.SPARSE
    assert info.stream_bytes["syms"] == len(at) and info.stream_bytes["long"] == 4 * far
    assert_same(codec.decode(payload, v0), v1)
    target = {"w": v0["w"].clone()}
    codec.apply_(codec.encode(v1, v0, block=1 << 20), target)
    assert_same(target, v1)


def _rewrite_stream(payload: bytes, key: str, edit) -> bytes:
    """Decompress, let `edit` change the bytes of one stream (a writable numpy view), recompress."""
    raw = bytearray(zstandard.ZstdDecompressor().decompress(payload))
    (hlen,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + hlen])[key]["data_offsets"]
    edit(np.frombuffer(raw, np.uint8)[8 + hlen + start : 8 + hlen + end])
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(bytes(raw))


def test_corrupt_sparse_streams_rejected_before_any_change():
    gen = torch.Generator().manual_seed(6)
    v0 = {"w": random_tensor(gen, (4000,), torch.bfloat16)}
    v1 = {"w": v0["w"].clone()}
    bits(v1["w"]).view(-1)[[3, 10, 500, 900, 3999]] += torch.tensor([1, -1, 1, 5, -1], dtype=torch.int16)
    # gaps 3, 6, 489, 399, 3098 -> symbols 9, 19, 252 (+1, long), 254 (other, long), 253 (-1, long); long gaps
    # 405, 315, 3014 (4 byte planes of 3); other values [5]
    payload = codec.encode(v1, v0, block=4096, methods=[codec.SPARSE])
    assert_same(codec.decode(_rewrite_stream(payload, "w::syms", lambda b: None), v0), v1)  # a faithful rewrite

    def setting(stream: str, i: int, value: int):
        def edit(b):
            b[i] = value
        return stream, edit

    cases = [
        ("symbol", setting("w::syms", 2, 255)),  # never written (and still counted as far)
        ("long gaps", setting("w::syms", 2, 3 * 10)),  # a far change made near: its long gap is left over
        ("other values", setting("w::syms", 1, 3 * 6 + 2)),  # a -1 made "other": no other value for it
        ("beyond", setting("w::syms", 0, 3 * 83)),  # the first gap grown by 80: the last change leaves the block
        ("beyond", setting("w::long", 9, 0x40)),  # the top byte plane of the first long gap: 2**30 + 405
    ]
    for match, (stream, edit) in cases:
        bad = _rewrite_stream(payload, stream, edit)
        with pytest.raises(ValueError, match=match):
            codec.decode(bad, v0)
        with pytest.raises(ValueError, match=match):
            codec.inspect(bad)
        target = {"w": v0["w"].clone()}
        with pytest.raises(ValueError, match=match):
            codec.apply_(bad, target)
        assert_same(target, v0)


def test_old_format_rejected_by_name():
    v0, v1 = _pair()

    def set_format(m):
        m["format"] = "heterorl-codec/1"

    with pytest.raises(ValueError, match="heterorl-codec/1.*expected 'heterorl-codec/2'"):
        codec.decode(_rewrite(codec.encode(v1, v0), set_format), v0)


def _reference_digest(tensors, h) -> str:
    for name in sorted(tensors):
        t = tensors[name]
        head = json.dumps([name, "bfloat16", list(t.shape)], separators=(",", ":")).encode()
        h.update(struct.pack("<Q", len(head)) + head + bits(t).numpy().tobytes())
    return h.hexdigest()


def test_digest_keeps_its_domain_across_payload_formats():
    """Runs persist version hashes and a resumed learner checks its weights against them, so the hash must not
    follow the payload format: recompute it independently with its original domain string (BLAKE3, named)."""
    import blake3

    v0, _ = _pair()
    assert codec.digest(v0) == "blake3:" + _reference_digest(v0, blake3.blake3(b"heterorl-codec/1"))


def test_legacy_sha256_digests_still_verify_and_unknown_ones_are_refused_by_name():
    """Runs recorded before BLAKE3 hold bare sha256 digests: `like=` recomputes in the recorded algorithm (same
    input), so their checkpoints and versions still verify. A digest naming another algorithm is refused by name."""
    v0, _ = _pair()
    legacy = _reference_digest(v0, hashlib.sha256(b"heterorl-codec/1"))
    assert codec.digest(v0, like=legacy) == legacy and codec.digest_algorithm(legacy) == codec.DIGEST_SHA256
    new = codec.digest(v0)
    assert codec.digest(v0, like=new) == new and codec.digest_algorithm(new) == codec.DIGEST_BLAKE3
    assert codec.digest({k: v.float() for k, v in v0.items()}, dtype=torch.bfloat16, like=legacy) == legacy
    for bad in ("sha3:" + "0" * 64, "blake3:" + "0" * 63, "blake3:" + "G" * 64, "0" * 63, ""):
        with pytest.raises(ValueError, match="unknown weights digest"):
            codec.digest(v0, like=bad)


def test_streamed_container_equals_one_shot(monkeypatch):
    """Containers above the one-shot size are streamed through zstd; both paths hold the same bytes."""
    v0, v1 = _pair()
    one_shot = zstandard.ZstdDecompressor().decompress(codec.encode(v1, v0, block=SMALL_BLOCK))
    monkeypatch.setattr(codec, "_ONE_SHOT", 0)
    streamed = codec.encode(v1, v0, block=SMALL_BLOCK)
    assert zstandard.ZstdDecompressor().decompress(streamed) == one_shot
    assert_same(codec.decode(streamed, v0), v1)


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_byte_planes_both_ways(itemsize):
    """Short arrays take a transposed copy, long ones shifts: both give little-endian planes and invert."""
    rng = np.random.default_rng(itemsize)
    dt = np.dtype(f"u{itemsize}")
    for n in (0, 5, codec._SHIFT_PLANES - 1, codec._SHIFT_PLANES, 3 * codec._SHIFT_PLANES + 7):
        x = rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
        planes = codec._planes(x)
        want = np.stack([(x >> (8 * i)).astype(np.uint8) for i in range(itemsize)]).reshape(-1) if n else planes
        assert np.array_equal(planes, want)
        back = np.empty(n, dt)
        codec._unplanes(planes, back)
        assert np.array_equal(back, x)
