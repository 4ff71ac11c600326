"""A worker stopped with SIGTERM or SIGINT leaves its group (issue 11), against the real
embedded broker: a successor on another host is assigned at once, not after this
worker's session (6 s). aiokafka leaves only for a generation > 0, and Tansu numbers a
group's first generation 0, so a lone worker stayed a member after exiting.
"""

from __future__ import annotations

import os
import signal

import pytest

from streams.worker.transport import member_client_id
from tests.test_transport import group_members
from tests.test_worker_faults import committed, ends_of, first_records, judged

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stopped_worker_leaves_its_group_after_its_last_commit(demo, tmp_path, signum):
    folder, paths = demo
    records = first_records(paths)
    with judged(folder, tmp_path, records) as (broker, worker, log):
        members = group_members(broker, "modelwatch")
        os.killpg(worker.pid, signum)
        code = worker.wait(timeout=30)
        left = group_members(broker, "modelwatch")
        after = committed(broker)
    said = log.read_text(errors="replace")
    assert code == 0, said[-3000:]
    own = member_client_id().removesuffix(str(os.getpid())) + f"{worker.pid}-"
    assert len(members) == 1 and members[0].startswith(own), members
    assert left == [], said[-3000:]
    # Leaving comes after the last commit: the offsets judged stay committed.
    ends = ends_of(records)
    assert all(after.get(tp, 0) >= end for tp, end in ends.items()), (after, ends)
    assert "could not leave" not in said and "Traceback" not in said, said[-3000:]
