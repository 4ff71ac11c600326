"""A restarted worker reads and sums its stored clients from the state folder while its
group forms (:class:`streams.worker.tables.Prefetch`), and uses that only if nothing was
recovered into the partition's database since."""

from __future__ import annotations

import faust
import numpy as np
from faust.types import TP

from detectors.clients import ClientState
from streams.worker.tables import KeyedStates, Prefetch, _as_partition
from tests.test_decode import inference_judge, records


def stored_table(tmp_path, digits):
    """A Faust table on RocksDB (as the worker's) holding partition 0's judged clients,
    with its changelog offset; and the same values as a dict."""
    values = [e for c in range(5) for e in digits.events(f"c{c}", digits.X_pool[4 * c:4 * c + 4],
                                                          ip=f"198.51.100.{c % 2}")]
    first, _, _ = inference_judge(digits.profile, {})
    first(records(0, values))
    writes = {key: value for _, _, key, value in first.clients.snapshot({0})}
    app = faust.App("prefetch-test", store="rocksdb://", datadir=str(tmp_path))
    table = app.Table("clients", partitions=1, key_type=bytes, value_type=bytes)
    with _as_partition(0):
        for key, value in writes.items():
            table.data[key] = value
    changelog = TP(table.changelog_topic.get_topic_name(), 0)
    table.data.set_persisted_offset(changelog, len(writes) - 1)
    return app, table, changelog, writes


def prefetched_for(app, table) -> KeyedStates:
    clients = KeyedStates(table, ClientState)
    clients.prefetch = Prefetch(app.conf.tabledir, "clients", ClientState)
    clients.prefetch.start()
    return clients


def test_a_prefetched_partition_restores_the_same_population_and_keys(tmp_path, digits):
    app, table, _, writes = stored_table(tmp_path, digits)
    clients = prefetched_for(app, table)
    gathered = clients.prefetched(0)
    assert gathered is not None and len(gathered.clients) == 5
    assert clients.prefetched(0) is None  # taken once

    ours, _, _ = inference_judge(digits.profile, {})
    ours.pipeline.restore_shard(0, gathered)
    theirs, _, _ = inference_judge(digits.profile, writes)
    theirs.pipeline.restore_shard(0, theirs.clients.restored(0))
    mine, read = ours.pipeline.pending[0]["digits"], theirs.pipeline.pending[0]["digits"]
    assert mine.ips == read.ips and len(mine.ips) == 2
    assert np.array_equal(mine.class_counts, read.class_counts) and mine.class_counts.sum() == 20
    assert np.array_equal(mine.rate_hist, read.rate_hist)
    assert ours.pipeline.tracked.last == theirs.pipeline.tracked.last
    # The keys' positions come along, so a record read again is skipped as before.
    assert set(clients.applied) == {k.decode() for k in writes}
    assert clients.holds("digits/c2", 0, 0) and not clients.holds("digits/c2", 0, 99)


def test_a_partition_recovered_into_after_the_read_is_read_again(tmp_path, digits):
    app, table, changelog, _ = stored_table(tmp_path, digits)
    clients = prefetched_for(app, table)
    clients.prefetch.done.wait()
    # Faust's recovery applied a changelog record the read did not see.
    table.data.set_persisted_offset(changelog, 1_000)
    assert clients.prefetched(0) is None
    assert len(list(clients.restored(0))) == 5


def test_a_loaded_key_or_a_partition_not_assigned_is_not_taken_from_the_read(tmp_path, digits):
    app, table, _, _ = stored_table(tmp_path, digits)
    clients = prefetched_for(app, table)
    assert clients["digits/c0"] is not None  # loaded before the restore
    assert clients.prefetched(0) is None
    again = prefetched_for(app, table)
    again.prefetch.done.wait()
    again.prefetch.assigned({1})
    assert again.prefetched(0) is None
