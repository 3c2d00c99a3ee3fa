"""KVOutputAggregator: the ranks' outputs become one agreed outcome (pure logic)."""

from kvxfer.connectors.base import (
    ConnectorMetadata,
    KVConnectorOutput,
    KVOutputAggregator,
    RecvRequest,
    SendRequest,
    TransferStats,
)


def out(**kw) -> KVConnectorOutput:
    return KVConnectorOutput(**kw)


def expecting(world_size: int, recv=(), send=()) -> KVOutputAggregator:
    """An aggregator told that the loads `recv` and the holds `send` started on the ranks."""
    agg = KVOutputAggregator(world_size)
    agg.expect(ConnectorMetadata(
        recv=[RecvRequest(r, r, "prefill", "inst", "127.0.0.1", 5600, 1, "t" * 32, [], [], []) for r in recv],
        send=[SendRequest(s, "t" * 32) for s in send],
    ))
    return agg


def test_receive_is_reported_once_every_rank_has_reported_it():
    agg = expecting(2, recv=["a"])
    first = agg.aggregate([out(finished_recving={"a"}, recv_stats={"a": TransferStats(100, 2, 0.5)}), out()])
    assert first.is_empty()
    second = agg.aggregate([out(), out(finished_recving={"a"}, recv_stats={"a": TransferStats(60, 3, 0.7)})])
    assert second.finished_recving == {"a"} and not second.failed_recving
    assert second.recv_stats["a"] == TransferStats(160, 5, 0.7)
    assert agg.aggregate([out(), out()]).is_empty()


def test_a_failure_on_one_rank_fails_everywhere_but_only_when_all_ranks_are_done():
    agg = expecting(3, recv=["b"])
    assert agg.aggregate([out(failed_recving={"b": "READ failed"}), out(finished_recving={"b"}), out()]).is_empty()
    result = agg.aggregate([out(), out(), out(failed_recving={"b": "peer gone"})])
    assert result.failed_recving == {"b": "READ failed; peer gone"} and not result.finished_recving
    assert "b" not in result.recv_stats


def test_failure_kind_is_agreed_and_a_params_fault_wins():
    agg = expecting(2, recv=["c", "d"])
    result = agg.aggregate([out(failed_recving={"c": "READ failed"}, failure_kinds={"c": "peer"}),
                            out(failed_recving={"c": "bad ids"}, failure_kinds={"c": "params"})])
    assert result.failure_kinds == {"c": "params"}
    result = agg.aggregate([out(failed_recving={"d": "READ failed"}, failure_kinds={"d": "peer"}),
                            out(finished_recving={"d"})])
    assert result.failure_kinds == {"d": "peer"}


def test_sends_finish_on_all_ranks_and_expiry_is_kept():
    agg = expecting(2, send=["x", "y"])
    result = agg.aggregate([
        out(finished_sending={"x", "y"}, expired_sending={"y"}),
        out(finished_sending={"x"}),
    ])
    assert result.finished_sending == {"x"} and not result.expired_sending
    result = agg.aggregate([out(), out(finished_sending={"y"}, expired_sending={"y"})])
    assert result.finished_sending == {"y"} and result.expired_sending == {"y"}


def test_a_release_on_any_rank_counts_as_released_not_expired():
    agg = expecting(2, send=["r"])
    result = agg.aggregate([out(finished_sending={"r"}, expired_sending={"r"}),
                            out(finished_sending={"r"}, released_sending={"r"})])
    assert result.finished_sending == {"r"} and result.released_sending == {"r"} and not result.expired_sending


def test_a_rank_reporting_twice_does_not_stand_in_for_a_rank_that_has_not_reported():
    agg = expecting(2, recv=["a"], send=["s"])
    assert agg.aggregate([out(finished_recving={"a"}, finished_sending={"s"}), out()]).is_empty()
    assert agg.aggregate([out(finished_recving={"a"}, finished_sending={"s"}), out()]).is_empty()
    result = agg.aggregate([out(), out(finished_recving={"a"}, finished_sending={"s"})])
    assert result.finished_recving == {"a"} and result.finished_sending == {"s"}


def test_a_rank_without_output_counts_as_not_reported():
    agg = expecting(2, recv=["b"])
    assert agg.aggregate([out(failed_recving={"b": "READ failed"}), None]).is_empty()
    assert agg.aggregate([None, out(finished_recving={"b"})]).failed_recving == {"b": "READ failed"}


def test_a_report_repeated_after_completion_does_not_count_for_a_later_request_of_that_id():
    agg = expecting(2, recv=["a"])
    assert agg.aggregate([out(finished_recving={"a"}), out(finished_recving={"a"})]).finished_recving == {"a"}
    assert agg.aggregate([out(finished_recving={"a"}), out()]).is_empty()  # rank 0 repeats itself
    again = RecvRequest("a", "a2", "prefill", "inst", "127.0.0.1", 5600, 1, "t" * 32, [], [], [])
    agg.expect(ConnectorMetadata(recv=[again]))
    assert agg.aggregate([out(), out(finished_recving={"a"})]).is_empty()  # rank 0's READ still in flight
    assert agg.aggregate([out(failed_recving={"a": "READ failed"}), out()]).failed_recving == {"a": "READ failed"}


def test_refused_notifications_are_summed_over_the_ranks():
    agg = expecting(2)
    total = agg.aggregate([out(refused_notifications=2), None])
    assert total.refused_notifications == 2 and not total.is_empty()  # reported, though nothing finished
    assert agg.aggregate([out(refused_notifications=1), out(refused_notifications=3)]).refused_notifications == 4
    assert agg.aggregate([out(), out()]).is_empty()
