"""KVTransferConfig validation and kv_transfer_params parsing (pure logic)."""

import pytest

from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.metadata import (
    RemoteDecodeParams,
    RemotePrefillParams,
    compat_of,
    parse_kv_transfer_params,
    remote_prefill_params,
)
from kvxfer.specs import FullAttentionSpec


def test_config_defaults_and_roles():
    decode = KVTransferConfig(role="decode")
    assert decode.is_consumer and not decode.is_producer and decode.backends == ("UCX",)
    prefill = KVTransferConfig(role="prefill", side_channel_port=5600, backends=["UCX"])
    assert prefill.is_producer and prefill.backends == ("UCX",)
    assert KVTransferConfig(role="decode").engine_id != decode.engine_id


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"connector": "lmcache"}, "connector"),
        ({"role": "producer"}, "role"),
        ({"failure_policy": "retry"}, "failure_policy"),
        ({"engine_id": ""}, "engine_id"),
        ({"engine_id": "a b"}, "engine_id"),
        ({"side_channel_port": 70000}, "side_channel_port"),
        ({"role": "prefill"}, "side_channel_port"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"handshake_timeout_s": -1}, "handshake_timeout_s"),
        ({"transfer_timeout_s": "5"}, "transfer_timeout_s"),
        ({"backends": ()}, "backends"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    kwargs = {"role": "decode", **kwargs}
    with pytest.raises(ValueError, match=field):
        KVTransferConfig(**kwargs)


def good_params(**override):
    params = remote_prefill_params("eng-1", "127.0.0.1", 5600, [4, 9, 2], "req-1", 2, 40, "0" * 32)
    params.update(override)
    return params


def test_params_round_trip():
    parsed = parse_kv_transfer_params(good_params())
    assert isinstance(parsed, RemotePrefillParams)
    assert parsed.remote_block_ids == [4, 9, 2] and parsed.remote_tp_size == 2
    assert isinstance(parse_kv_transfer_params({"do_remote_decode": True}), RemoteDecodeParams)
    assert parse_kv_transfer_params(None) is None
    assert parse_kv_transfer_params({"do_remote_prefill": False}) is None


@pytest.mark.parametrize(
    "params,match",
    [
        (good_params(remote_block_ids=[1, -3]), r"remote_block_ids\[1\]"),
        (good_params(remote_port="5600"), "remote_port"),
        (good_params(remote_port=0), "remote_port"),
        (good_params(remote_tp_size=0), "remote_tp_size"),
        (good_params(remote_engine_id=""), "remote_engine_id"),
        (good_params(remote_block_ids="1,2"), "remote_block_ids"),
        ({k: v for k, v in good_params().items() if k != "remote_host"}, "remote_host"),
        (good_params(do_remote_decode=True), "exclusive"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_params_are_a_clear_error(params, match):
    with pytest.raises(ValueError, match=match):
        parse_kv_transfer_params(params)


def test_params_shape_checks_against_the_peer():
    parsed = parse_kv_transfer_params(good_params())
    parsed.check_shape(block_size=16, num_blocks=10)
    with pytest.raises(ValueError, match="needs 5"):
        parsed.check_shape(block_size=8, num_blocks=10)
    with pytest.raises(ValueError, match=r"out of range for the peer's pool of 9 blocks"):
        parsed.check_shape(block_size=16, num_blocks=9)
    with pytest.raises(ValueError, match="repeat"):
        parse_kv_transfer_params(good_params(remote_block_ids=[1, 1, 2])).check_shape(16, 10)


def test_compat_mismatch_names_every_differing_field():
    a = compat_of(FullAttentionSpec(4, 8, 2, 16, "float32"), "qwen3:abc")
    b = compat_of(FullAttentionSpec(4, 8, 3, 16, "bfloat16"), "qwen3:abc")
    assert a.hash() != b.hash() and a.mismatch(a) is None
    message = a.mismatch(b)
    assert "num_layers: local 2 != remote 3" in message and "dtype" in message and "head_size" not in message
