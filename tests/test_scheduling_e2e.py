"""Adaptive leases with real samplers of different speeds: a near one on loopback and a far one behind a 400 ms
link (the project's link emulator), both asking for 4 groups at a time, against a real learner whose in-flight
window (6 groups) cannot hold both samplers' asks at once.

What must hold: both samplers get groups trained (the far one is not shut out, the near one is not starved), the
near one trains more; once the far sampler has been measured its leases expire after a few of its own round trips
instead of lease_ttl_s; and when it freezes holding leases (SIGSTOP) they expire within that shortened time and
the run trains on with the near sampler.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import defaultdict

import pytest

from heterorl.tools.linkem import LinkEmulator, LinkSpec, parse_hostport

TTL = 120.0


def leases_by_sampler(run_dir) -> dict[str, list[tuple[float, float, str]]]:
    con = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT sampler_id, issued_at, expires_at, state FROM leases ORDER BY serial").fetchall()
        names = dict(con.execute("SELECT sampler_id, json_extract(record, '$.name') FROM samplers").fetchall())
    finally:
        con.close()
    out: dict[str, list] = defaultdict(list)
    for sid, issued, expires, state in rows:
        out[names.get(sid, sid)].append((issued, expires, state))
    return out


def trained_counts(leases) -> dict[str, int]:
    return {name: sum(s == "trained" for *_, s in rows) for name, rows in leases.items()}


@pytest.mark.slow
def test_adaptive_leases_with_a_near_and_a_far_sampler(processes, tmp_path):
    run_dir = tmp_path / "run"
    learner, target = processes.learner(
        run_dir, lease_policy="adaptive", lease_ttl_s=TTL, lease_min_ttl_s=2, groups_per_step=2,
        max_inflight_groups=6, max_steps=0, eval_every=0, eval_size=0, keep_versions=64, checkpoint_every=0)
    with LinkEmulator(("127.0.0.1", 0), parse_hostport(target), LinkSpec(delay_ms=400, seed=1)) as link:
        near = processes.sampler("near", target, "--max-batch", "4")
        far = processes.sampler("far", f"127.0.0.1:{link.address[1]}", "--max-batch", "4")
        deadline = time.time() + 240
        frozen_at = None
        held: list = []
        try:
            # Wait until the far sampler has been measured (a lease shorter than TTL) and holds leases; freeze it.
            while frozen_at is None:
                assert learner.poll() is None and time.time() < deadline, "the far sampler was never measured"
                time.sleep(0.3)
                if (run_dir / "run.db").exists():
                    rows = leases_by_sampler(run_dir).get("far", [])
                    if any(e - i < TTL for i, e, _ in rows) and any(s == "outstanding" for *_, s in rows):
                        far.send_signal(signal.SIGSTOP)
                        frozen_at = time.time()
                        held = [(i, e) for i, e, s in leases_by_sampler(run_dir)["far"] if s == "outstanding"]
            before = trained_counts(leases_by_sampler(run_dir)).get("near", 0)
            # Its leases expire within their shortened time (not TTL), and the run trains on without it.
            while True:
                leases = leases_by_sampler(run_dir)
                still = [1 for *_, s in leases["far"] if s == "outstanding"]
                if not still and trained_counts(leases).get("near", 0) >= before + 4:
                    break
                assert time.time() - frozen_at < TTL / 2, f"far leases still outstanding: {leases['far'][-6:]}"
                assert learner.poll() is None, processes.logs.joinpath("learner.log").read_text()[-3000:]
                time.sleep(0.3)
        finally:
            if frozen_at is not None:
                far.send_signal(signal.SIGCONT)
    assert held
    leases = leases_by_sampler(run_dir)
    trained = trained_counts(leases)
    assert trained.get("near", 0) > trained.get("far", 0) > 0, trained
    ttls = [e - i for i, e, _ in leases["far"]]
    assert ttls[0] == pytest.approx(TTL)  # before any measurement: lease_ttl_s
    assert all(e - i < TTL / 2 for i, e in held), held  # measured: a few of its own round trips
    assert near.poll() is None
