"""`heterorl status --watch`: the live table, as plain frames and in a real terminal (tmux) against a live learner."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from heterorl.cli import fetch_status
from heterorl.tools.watch import Rates, plain_frame, watch
from heterorl.v1 import learner_pb2 as pb

from conftest import REPO


def _status(step: int, trained: int, accepted: int, version: int = 5) -> pb.StatusReply:
    return pb.StatusReply(
        run_id="run-1", version=version, step=step, groups_trained=trained, task="arithmetic", loss="gepo",
        last_eval_accuracy=0.25, last_reward_mean=0.5,
        samplers=[
            pb.SamplerStatus(sampler_id="S-aaaaaaaaaaaaaaaa", name="fast", engine="vllm", version=version,
                             groups_accepted=accepted, alive=True, last_seen_s_ago=1.0, logprob_checked=3,
                             logprob_mean_diff=0.0125),
            pb.SamplerStatus(sampler_id="S-bbbbbbbbbbbbbbbb", name="slow", engine="transformers", version=2,
                             groups_rejected=4, alive=False, last_seen_s_ago=90.0),
        ],
    )


def test_frame_shows_each_sampler_and_groups_per_minute():
    rates = Rates()
    rates.update(_status(1, 10, 10), now=100.0)
    assert rates.trained_per_min is None  # one poll is no rate yet
    rates.update(_status(3, 40, 50), now=130.0)  # 30 trained and 40 accepted in half a minute
    frame = plain_frame(_status(3, 40, 50), rates, "127.0.0.1:1")
    assert "step 3  version 5  held-out accuracy 0.250" in frame
    assert "groups/min trained 60.0 accepted 80.0" in frame
    rows = {line.split()[1]: line.split() for line in frame.splitlines() if line.startswith("S-")}
    # name -> engine, version, lag behind the learner's version 5, accepted, refused, mismatch score, state
    assert rows["fast"][2:8] == ["vllm", "5", "0", "50", "0", "0.0125"] and rows["fast"][-1] == "alive"
    assert rows["slow"][2:8] == ["transformers", "2", "3", "0", "4", "-"] and rows["slow"][-1] == "gone"


def test_watch_redraws_and_survives_an_unreachable_learner():
    import grpc

    answers = iter([_status(1, 2, 2), grpc.RpcError(), _status(2, 4, 4)])

    def fetch():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    out = io.StringIO()
    assert watch("127.0.0.1:1", 0.01, fetch, out=out, iterations=3) == 0
    frames = out.getvalue()
    assert "step 1 " in frames and "did not answer" in frames and "step 2 " in frames
    assert watch("127.0.0.1:1", 0, fetch, out=io.StringIO()) == 2  # --interval 0 is refused


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_watch_in_a_real_terminal(processes, tmp_path):
    _, target = processes.learner(tmp_path / "run")
    processes.sampler("watch-sampler", target, "--max-batch", "2")
    deadline = time.time() + 180
    while fetch_status(target).step < 1:
        assert time.time() < deadline, "the learner did not take a step"
        time.sleep(0.5)

    socket = f"heterorl-test-{uuid.uuid4().hex[:8]}"  # a tmux server of this test's own
    tmux = ["tmux", "-L", socket]
    command = f"{sys.executable} -m heterorl.cli status --watch --interval 0.5 --learner {target}"
    subprocess.run([*tmux, "new-session", "-d", "-s", "watch", "-x", "160", "-y", "40", "-c", str(REPO), command],
                   check=True, env={**processes.env, "TERM": "xterm-256color"})
    try:
        steps: list[int] = []
        pane = ""
        while len(set(steps)) < 2:  # the table is redrawn: two different steps seen on screen
            assert time.time() < deadline, f"no live table in the pane:\n{pane}"
            time.sleep(0.5)
            pane = subprocess.run([*tmux, "capture-pane", "-p", "-t", "watch"], capture_output=True, text=True).stdout
            found = re.search(r"step (\d+)  version (\d+)", pane)
            if found and "watch-sampler" in pane:
                steps.append(int(found.group(1)))
        row = next(line for line in pane.splitlines() if "watch-sampler" in line)
        assert "transformers" in row and "alive" in row
        assert re.search(r"groups/min trained \d+\.\d", pane)
        subprocess.run([*tmux, "send-keys", "-t", "watch", "C-c"], check=True)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
