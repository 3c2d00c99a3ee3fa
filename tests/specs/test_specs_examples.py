"""Worked examples of TP transfer slices, expected values derived by hand from the definitions.

Definitions used: with tp <= H a rank r holds heads [r*H/tp, (r+1)*H/tp); with tp > H rank r holds
head r // (tp/H). Decode ("local", D_tp) reads from prefill ("remote", P_tp). A head with n decode
readers and m prefill replicas is read round-robin over the replicas starting at replica
(head * n) % m; an unread replica at round-robin position t is notified by reader t % n.
"""

from kvxfer.specs import FullAttentionSpec, MLAAttentionSpec, TPTransferSlice


def S(remote_rank, global_heads, local_heads, remote_heads):
    return TPTransferSlice(remote_rank, range(*global_heads), range(*local_heads), range(*remote_heads))


def plan(spec, d_tp, p_tp):
    slices = [spec.get_tp_transfer_slices(q, d_tp, p_tp) for q in range(d_tp)]
    notify = [spec.notify_targets(q, d_tp, p_tp) for q in range(d_tp)]
    consumers = [spec.consumers(r, d_tp, p_tp) for r in range(p_tp)]
    return slices, notify, consumers


def gqa(num_heads):
    return FullAttentionSpec(num_heads, 16, 2, 4, "float32")


def test_h8_prefill2_decode4():
    # Prefill: r0 holds heads 0-3, r1 heads 4-7. Decode: 2 heads each, q0 0-1 .. q3 6-7.
    # q0/q1 read the first/second half of r0; q2/q3 the halves of r1. One slice each.
    slices, notify, consumers = plan(gqa(8), 4, 2)
    assert slices == [
        [S(0, (0, 2), (0, 2), (0, 2))],
        [S(0, (2, 4), (0, 2), (2, 4))],
        [S(1, (4, 6), (0, 2), (0, 2))],
        [S(1, (6, 8), (0, 2), (2, 4))],
    ]
    assert notify == [[0], [0], [1], [1]]
    assert consumers == [[0, 1], [2, 3]]


def test_h8_prefill4_decode2():
    # Prefill: 2 heads each (r0 0-1, r1 2-3, r2 4-5, r3 6-7). Decode q0 holds 0-3, q1 4-7:
    # each decode rank reads the whole tensor of two prefill ranks into its two halves.
    slices, notify, consumers = plan(gqa(8), 2, 4)
    assert slices == [
        [S(0, (0, 2), (0, 2), (0, 2)), S(1, (2, 4), (2, 4), (0, 2))],
        [S(2, (4, 6), (0, 2), (0, 2)), S(3, (6, 8), (2, 4), (0, 2))],
    ]
    assert notify == [[0, 1], [2, 3]]
    assert consumers == [[0], [0], [1], [1]]


def test_h2_prefill4_decode2_prefill_replicates():
    # Prefill replicates: r0, r1 hold head 0; r2, r3 hold head 1. Decode q0 head 0, q1 head 1.
    # Head 0: one reader, start replica (0*1) % 2 = 0 -> r0; r1 unread, position 1 -> reader 1 % 1 = q0.
    # Head 1: start replica (1*1) % 2 = 1 -> r3; r2 unread, position (0-1) % 2 = 1 -> q1.
    slices, notify, consumers = plan(gqa(2), 2, 4)
    assert slices == [[S(0, (0, 1), (0, 1), (0, 1))], [S(3, (1, 2), (0, 1), (0, 1))]]
    assert notify == [[0, 1], [2, 3]]
    assert consumers == [[0], [0], [1], [1]]


def test_h2_prefill1_decode4_decode_replicates():
    # Prefill r0 holds heads 0-1. Decode replicates: q0, q1 hold head 0; q2, q3 head 1.
    # Everyone reads one head from r0 (offset 0 or 1 in r0's tensor) and notifies r0.
    slices, notify, consumers = plan(gqa(2), 4, 1)
    assert slices == [
        [S(0, (0, 1), (0, 1), (0, 1))],
        [S(0, (0, 1), (0, 1), (0, 1))],
        [S(0, (1, 2), (0, 1), (1, 2))],
        [S(0, (1, 2), (0, 1), (1, 2))],
    ]
    assert notify == [[0], [0], [0], [0]]
    assert consumers == [[0, 1, 2, 3]]


def test_h4_prefill8_decode8_equal_tp_with_replication():
    # Both sides replicate twice: ranks 2h and 2h+1 hold head h. Head h has 2 readers and
    # 2 replicas, start (h*2) % 2 = 0, so reader i reads replica i: decode q reads prefill q.
    slices, notify, consumers = plan(gqa(4), 8, 8)
    assert slices == [[S(q, (q // 2, q // 2 + 1), (0, 1), (0, 1))] for q in range(8)]
    assert notify == [[q] for q in range(8)]
    assert consumers == [[r] for r in range(8)]


def test_mla_prefill4_decode2():
    # Every prefill rank holds the latent (one "head", 4 replicas); 2 readers, start 0:
    # q0 reads r0, q1 reads r1. Unread r2 (position 2) -> q0 (2 % 2), r3 (position 3) -> q1.
    spec = MLAAttentionSpec(1, 576, 2, 4, "bfloat16")
    slices, notify, consumers = plan(spec, 2, 4)
    assert slices == [[S(0, (0, 1), (0, 1), (0, 1))], [S(1, (0, 1), (0, 1), (0, 1))]]
    assert notify == [[0, 2], [1, 3]]
    assert consumers == [[0], [1], [0], [1]]


def test_mla_prefill1_decode4():
    # One prefill rank: all four decode ranks read the whole latent block from r0 and notify it.
    spec = MLAAttentionSpec(1, 576, 2, 4, "bfloat16")
    slices, notify, consumers = plan(spec, 4, 1)
    assert slices == [[S(0, (0, 1), (0, 1), (0, 1))]] * 4
    assert notify == [[0]] * 4
    assert consumers == [[0, 1, 2, 3]]
