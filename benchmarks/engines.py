"""vLLM against the transformers engine on the default model: speed, weight-update latency, log-prob agreement.

A real learner (SmolLM2-135M, in this process, behind its real gRPC server) publishes version 1; both engines
download it through the sampler's client and load it. Then:

* throughput: the same prompts (arithmetic questions, chat-formatted) through both engines, every group of the
  batch in one call, G completions per prompt; output tokens per second = completion tokens / wall time;
* update cost (--updates times): the learner's fp32 weights take one AdamW-sized step (every weight moves by lr,
  random sign; --lr), it publishes the next version, and the vLLM sampler downloads the delta over loopback gRPC
  (every chunk and the whole payload checked against their sha256), applies it to its bf16 copy, then computes
  the weights digest while pushing the tensors into the live engine. Each update prints its CPU seconds (this
  process, all threads) by part: download, decode, digest, push; and its wall time. `apply_s` is the wall time of
  decode and then digest beside push (the part a faster link does not shrink); `publish_to_generate_s` adds the
  download: from then on the engine generates with the new version. `apply_cpu_s` is the CPU of download plus
  apply: the download's share includes the learner serving it (it runs in this process), so it is an upper
  bound for the sampler's. The RESULT line holds the medians over the updates;
* log-prob mismatch: vLLM's reported log-probs against the learner's recomputation
  (`heterorl.server.trainer.completion_logprobs`) on a model holding exactly the newest version (bf16 values in
  fp32).

The two cores are usually shared (other sessions, demo runs): the load average at start and end is printed, and
the figures are wall-clock, so read them with that in mind. `--busy 2` runs two busy-loop processes (one per
core, as a learner and another sampler would) while each update is downloaded and applied.

    python benchmarks/engines.py                       # 16 prompts x G=8 (128 sequences) x 48 tokens
    python benchmarks/engines.py --prompts 8 --repeat 2   # 64 sequences, best of two
    python benchmarks/engines.py --skip-hf --busy 2       # update cost with both cores busy

Ends with: RESULT vllm_tps=... hf_tps=... apply_s=... apply_cpu_s=... logprob_mad=...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _tokens(groups) -> int:
    return sum(len(c.token_ids) for g in groups for c in g)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompt groups generated together in one call")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-6, help="size of the simulated optimizer step")
    parser.add_argument("--repeat", type=int, default=1, help="timed generations per engine (best is reported)")
    parser.add_argument("--skip-hf", action="store_true", help="vLLM only (hf_tps reported as nan)")
    parser.add_argument("--updates", type=int, default=3, help="one-step deltas applied to the live vLLM engine")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy-loop processes running while each update is downloaded and applied")
    args = parser.parse_args()

    import torch

    from heterorl.common import codec
    from heterorl.common.config import from_flat
    from heterorl.common.model import load_causal_lm
    from heterorl.common.tasks import make_task
    from heterorl.common.weights import chunk_hashes, weight_tensors
    from heterorl.node.client import LearnerClient
    from heterorl.node.engine import SamplingSettings, TransformersEngine
    from heterorl.node.engine_vllm import VLLMEngine
    from heterorl.node.sampler import CLIENT_VERSION, _install_model_files
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server
    from heterorl.server.trainer import completion_logprobs

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores), torch threads "
          f"{torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = from_flat(LearnerConfig, port=0, run_dir=Path(tmp) / "run", eval_size=0,
                           max_new_tokens=args.max_new_tokens, group_size=args.group_size,
                           temperature=args.temperature, lease_ttl_s=3600)
        learner = Learner(config)
        server, port = build_server(learner, "127.0.0.1", 0)
        server.start()
        client = LearnerClient(f"127.0.0.1:{port}")
        sid = client.register("bench", "vllm", "cpu", args.prompts, CLIENT_VERSION).sampler_id
        model_dir = _install_model_files(client.model_files(sid), Path(tmp) / "cache")

        started = time.perf_counter()
        vllm = VLLMEngine(model_dir, seed=0)
        print(f"vLLM engine up in {time.perf_counter() - started:.1f}s (dtype {vllm.dtype})", flush=True)
        hf = None if args.skip_hf else TransformersEngine(model_dir, seed=0)
        anchor = client.fetch_weights(sid, have_version=0)
        for engine in filter(None, (vllm, hf)):
            engine.load_weights(anchor.encoding, anchor.payload, anchor.version, anchor.base_version,
                                anchor.weights_sha256)
        print(f"anchor v1: {len(anchor.payload) / 2**20:.0f} MiB, vLLM applied it in {vllm.last_apply.total_s:.2f}s "
              f"(decode {vllm.last_apply.decode_s:.2f}, then digest {vllm.last_apply.verify_s:.2f} beside "
              f"push {vllm.last_apply.push_s:.2f})", flush=True)

        task = make_task("arithmetic", seed=0)
        prompts = [learner.inputs.encode(task.train_problem(i)) for i in range(args.prompts)]
        sampling = SamplingSettings(args.temperature, 1.0, 0, args.max_new_tokens)
        rows = args.prompts * args.group_size
        tps: dict[str, float] = {}
        for engine in filter(None, (vllm, hf)):
            best = 0.0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                groups = engine.generate(prompts, args.group_size, sampling)
                seconds = time.perf_counter() - t0
                best = max(best, _tokens(groups) / seconds)
                print(f"{engine.name:>12}: {rows} sequences, {_tokens(groups)} tokens in {seconds:.1f}s "
                      f"= {_tokens(groups) / seconds:.1f} tokens/s", flush=True)
            tps[engine.name] = best

        # One optimizer-sized step on the learner's fp32 weights at a time, each published as the next version.
        generator = torch.Generator().manual_seed(1)
        updates = []
        for _ in range(args.updates):
            with torch.no_grad():
                for tensor in weight_tensors(learner.trainer.model).values():
                    tensor.add_(torch.randn(tensor.shape, generator=generator).sign_() * args.lr)
            encode_started = time.perf_counter()
            learner.publish()  # encodes the delta from the previous version up front, as every run does
            published = time.perf_counter()
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                if busy:
                    time.sleep(0.5)  # until they hold the cores
                started, cpu_started = time.perf_counter(), time.process_time()
                delta = client.fetch_weights(sid, have_version=vllm.version)
                downloaded, cpu_downloaded = time.perf_counter(), time.process_time()
                vllm.load_weights(delta.encoding, delta.payload, delta.version, delta.base_version,
                                  delta.weights_sha256)
                applied, cpu_applied = time.perf_counter(), time.process_time()
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            groups = vllm.generate(prompts[:1], args.group_size, sampling)
            first_group = time.perf_counter()
            timing = vllm.last_apply
            info = codec.inspect(delta.payload)
            # The client checked every chunk's hash and the whole payload's during the download; the same again:
            cpu_hashed = time.process_time()
            chunk_hashes(bytes(delta.payload), config.serve.chunk_bytes)
            hashlib.sha256(delta.payload).hexdigest()
            chunk_check_cpu = time.process_time() - cpu_hashed
            download_cpu = cpu_downloaded - cpu_started
            update = {"apply_s": timing.total_s, "publish_to_generate_s": applied - started,
                      "apply_cpu_s": cpu_applied - cpu_started}
            updates.append(update)
            print(f"delta v{delta.base_version}->v{delta.version}: {len(delta.payload) / 2**20:.2f} MiB "
                  f"({info.method_counts()}), learner encode {published - encode_started:.2f}s, load "
                  f"{os.getloadavg()[0]:.1f}{f' with {len(busy)} busy loops' if busy else ''}\n"
                  f"  CPU {update['apply_cpu_s']:.3f}s = download {download_cpu:.3f} (chunk and payload hashes "
                  f"{chunk_check_cpu:.3f} of it) + decode {timing.decode_cpu_s:.3f} + digest "
                  f"{timing.digest_cpu_s:.3f} + push {timing.push_cpu_s:.3f} ({timing.tensors_pushed} tensors)\n"
                  f"  wall {applied - started:.2f}s = download {downloaded - started:.2f} + apply "
                  f"{timing.total_s:.2f} (decode {timing.decode_s:.2f}, then digest {timing.verify_s:.2f} beside "
                  f"push {timing.push_s:.2f}); first group with it {first_group - applied:.2f}s", flush=True)
        median = {key: statistics.median(u[key] for u in updates) for key in updates[0]}
        publish_to_generate = median["publish_to_generate_s"]  # the engine can generate with it from there on

        # Log-probs: vLLM's against the learner's recomputation on exactly the newest version.
        groups = vllm.generate(prompts, args.group_size, sampling)
        reference = load_causal_lm(learner.inputs.model_dir)
        with torch.no_grad():
            source = learner.trainer.snapshot()  # bf16, as published: no step since the newest version
            for name, tensor in weight_tensors(reference).items():
                tensor.copy_(source[name].float())
            diffs = []
            for prompt, group in zip(prompts, groups):
                sequences = [prompt + c.token_ids for c in group]
                logprobs, mask = completion_logprobs(reference, sequences, [len(prompt)] * len(group),
                                                     args.temperature, learner.inputs.pad_id)
                reported = torch.zeros_like(logprobs)
                for row, c in enumerate(group):
                    reported[row, : len(c.logprobs)] = torch.tensor(c.logprobs)
                diffs.append((logprobs - reported).abs()[mask])
        diff = torch.cat(diffs)
        mad, worst = float(diff.mean()), float(diff.max())
        print(f"log-probs, vLLM vs learner recomputation ({diff.numel()} tokens): mean abs diff {mad:.2e}, "
              f"max {worst:.2e}", flush=True)

        vllm.close()
        client.close()
        server.stop(0)
    vllm_tps, hf_tps = tps.get("vllm", float("nan")), tps.get("transformers", float("nan"))
    print(f"load average at end: {os.getloadavg()[0]:.2f}; vLLM / transformers = {vllm_tps / hf_tps:.2f}x; "
          f"published -> generating with it: {publish_to_generate:.2f}s", flush=True)
    print(f"RESULT vllm_tps={vllm_tps:.1f} hf_tps={hf_tps:.1f} apply_s={median['apply_s']:.2f} "
          f"apply_cpu_s={median['apply_cpu_s']:.3f} logprob_mad={mad:.2e} logprob_max={worst:.2e} "
          f"publish_to_generate_s={publish_to_generate:.2f} busy={args.busy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
