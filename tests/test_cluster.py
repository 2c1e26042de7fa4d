"""benchmarks/cluster.py --quick: a learner and four samplers in network namespaces on emulated far links."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heterorl.tools.netns import netns_available

REPO = Path(__file__).resolve().parent.parent
AVAILABLE, WHY = netns_available()

RESULT_RE = re.compile(r"^RESULT sync_full_s=(\S+) sync_delta_s=(\S+) idle_frac=(\S+) p95_staleness=(\S+)$", re.M)
CATCHUP_RE = re.compile(r"^catch-up on .*?, (full|delta) .*?\(best ([\d.]+)\); payload ([\d.]+) MiB", re.M)
ROW_RE = re.compile(r"^(near|mid|far|lagger)\s+\S+ \S+\s+(\d+)\s", re.M)


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces not permitted here: {WHY}")
def test_cluster_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cluster.py"), "--quick", "--work-dir",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    match = RESULT_RE.search(proc.stdout)
    assert match, out[-4000:]
    full, delta, idle, p95 = (float(x) for x in match.groups())
    assert all(math.isfinite(x) for x in (full, delta, idle, p95)), match.group(0)

    # One round trip of the (300 ms, 20 Mbit/s) link is 0.6 s: no download can be faster, none should take minutes.
    assert 0.6 <= delta < 30 and 0.6 <= full < 30, match.group(0)
    # The codec and protocol at work: one combined delta over 10 versions is smaller than the anchor, and so it
    # crosses the slow link sooner, by the anchor's extra bytes at 20 Mbit/s: ~40 ms for the tiny model (0.13 vs
    # 0.03 MiB). Best of 3 downloads each, strictly; the medians (RESULT) with 50 ms for the CPU noise of a
    # loaded 2-core machine, where one slow download of 3 can move a median by that much.
    catchup = {kind: (float(best), float(mib)) for kind, best, mib in CATCHUP_RE.findall(proc.stdout)}
    assert set(catchup) == {"full", "delta"}, proc.stdout[-3000:]
    assert catchup["delta"][1] < catchup["full"][1], catchup
    assert catchup["delta"][0] < catchup["full"][0], catchup
    assert delta < full + 0.05, match.group(0)

    assert 0.0 <= idle < 1.0, match.group(0)
    assert 0 <= p95 <= 40, match.group(0)  # staleness in versions; the far sampler's groups are a few versions old

    # Every sampler, on every link, had groups trained.
    trained = {name: int(n) for name, n in ROW_RE.findall(proc.stdout)}
    assert set(trained) == {"near", "mid", "far", "lagger"}, proc.stdout[-3000:]
    assert all(n > 0 for n in trained.values()), trained
    # The lagging sampler refreshed with one combined delta after missing at least 10 versions.
    assert re.search(r"lagger \(--lag-versions\) refreshes: v\d+->v\d+ delta", proc.stdout), proc.stdout[-3000:]
