"""A short run of the fault campaign (benchmarks/faults.py) on real processes: about 20 s of faults.

Workers SIGKILLed mid-batch and restarted, Redis restarted under load, one API replica restarted
under load, and on a second topology the Redis primary SIGKILLed under sentinels (once with the
replica in sync, once with it 2 s behind); every job must be accounted for from the clients' and
from Redis's side, every answer must belong to its request, no request may hang, and the service
must recover from the outage and the failovers by itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.faults import run_campaign


@pytest.mark.slow
def test_short_fault_campaign_loses_no_job(tiny_repository: Path) -> None:
    result = run_campaign(
        tiny_repository, "tiny", kill_seconds=9, kill_every=3, outage_s=2, concurrency=8, log=lambda _m: None
    )
    phases = result["phases"]
    for name, phase in phases.items():
        assert phase["ok"], f"{name}: {phase['checks']} {phase['client_outcomes']} {phase['examples']}"
        assert phase["client_outcomes"].get("completed", 0) > 50, name

    killed = phases["worker_sigkill"]
    assert killed["workers_killed"] >= 2
    assert killed["jobs_held_by_killed_workers"] >= 1, "no kill landed while a worker held jobs"
    assert set(killed["client_outcomes"]) <= {"completed", "dead_lettered"}

    outage = phases["redis_restart"]
    assert outage["recovered"], outage
    assert set(outage["statuses_during_outage"]) <= {"rejected_unavailable"}  # 503, nothing else
    assert outage["generate_calls_during_outage"] == [503]
    assert outage["readyz_during_outage"] == [503]
    assert outage["first_success_after_restart_s"] < 5

    restart = phases["api_restart"]
    assert restart["exit_code"] == 0  # a clean, graceful stop
    # A request sent on a keep-alive connection the stopping replica was closing is cut off
    # ("connection_lost"); none of those had reached the queue.
    assert set(restart["client_outcomes"]) <= {"completed", "refused", "connection_lost"}
    assert restart["jobs_enqueued"] == restart["jobs_with_known_outcome"]

    for name in ("primary_killed", "primary_killed_replica_behind"):
        failover = phases[name]
        assert failover["recovered"] and failover["hung"] == 0, failover
        assert set(failover["client_outcomes"]) <= {"completed", "rejected_unavailable", "lost_in_failover"}
        assert failover["first_success_sent_after_kill_s"] < 15
    assert phases["primary_killed_replica_behind"]["jobs_rolled_back_by_failover"] > 0
    assert result["ok"]
