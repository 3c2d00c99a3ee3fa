"""KVTransferConfig validation and kv_transfer_params parsing (pure logic)."""

import pytest

import msgspec

from kvxfer.connectors.base import KVParamsError
from kvxfer.connectors.config import KVTransferConfig
from kvxfer.connectors.metadata import (
    RemoteDecodeParams,
    RemotePrefillParams,
    compat_of,
    parse_kv_transfer_params,
    split_held,
)
from kvxfer.specs import FullAttentionSpec, group_layers


def test_config_defaults_and_roles():
    decode = KVTransferConfig(role="decode")
    assert decode.is_consumer and not decode.is_producer and decode.backends == ("UCX",)
    prefill = KVTransferConfig(role="prefill", side_channel_port=5600, backends=["UCX"])
    assert prefill.is_producer and prefill.backends == ("UCX",)
    assert KVTransferConfig(role="decode").engine_id != decode.engine_id
    assert KVTransferConfig(role="decode").instance_id != decode.instance_id and len(decode.instance_id) == 16
    keyed = KVTransferConfig(role="decode", auth_key=b"k" * 32)
    assert "auth_key" not in repr(keyed) and "instance_secret" not in repr(keyed) and "kkkk" not in repr(keyed)


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
        ({"auth_key": b"short"}, "auth_key"),
        ({"auth_key": "a-str-not-bytes-0123456789"}, "auth_key"),
        ({"allowed_peers": ("10.0.0.0/33",)}, "allowed_peers"),
        ({"allowed_peers": ("host",)}, "allowed_peers"),
        ({"allowed_peers": ("10.0.0.1:5600",), "role": "prefill", "side_channel_port": 5600}, "allowed_peers"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    kwargs = {"role": "decode", **kwargs}
    with pytest.raises(ValueError, match=field):
        KVTransferConfig(**kwargs)


def test_allowed_peers_match_host_port_or_cidr_and_the_configured_peers():
    config = KVTransferConfig(role="decode", allowed_peers=("10.0.0.0/8", "pf-0:5600", "fd00::/8"),
                              peers=("192.168.1.5:7000",))
    assert config.peer_allowed("10.3.4.5", 1) and config.peer_allowed("pf-0", 5600)
    assert config.peer_allowed("fd00::1", 9) and config.peer_allowed("192.168.1.5", 7000)
    assert not config.peer_allowed("11.0.0.1", 1) and not config.peer_allowed("pf-0", 5601)
    assert not config.peer_allowed("192.168.1.5", 7001)
    assert not config.peer_allowed("localhost", 5600)  # names are never resolved to match a network
    assert KVTransferConfig(role="decode").peer_allowed("anything", 1)  # no list: any address


TOKEN = "ab" * 16


def good_params(**override):
    params = msgspec.to_builtins(
        RemotePrefillParams(True, "eng-1", "inst-1", "127.0.0.1", 5600, [4, 9, 2], "req-1", 2, 40, TOKEN, 5)
    )
    params.update(override)
    return params


def test_params_round_trip():
    parsed = parse_kv_transfer_params(good_params())
    assert isinstance(parsed, RemotePrefillParams)
    assert parsed.remote_block_ids == [4, 9, 2] and parsed.remote_tp_size == 2 and parsed.transfer_token == TOKEN
    assert parse_kv_transfer_params(parsed) is parsed  # parsed once; a struct passes through
    assert isinstance(parse_kv_transfer_params({"do_remote_decode": True}), RemoteDecodeParams)
    assert parse_kv_transfer_params(None) is None
    assert parse_kv_transfer_params({"do_remote_prefill": False}) is None


@pytest.mark.parametrize(
    "params,match",
    [
        (good_params(remote_block_ids=[1, -3]), r"remote_block_ids\[1\]"),
        # Past what msgpack and the descriptors carry: refused at parse time (issue 20, hole 2).
        (good_params(remote_block_ids=[1, 2**64]), r"remote_block_ids\[1\]"),
        (good_params(remote_block_ids=[2**63]), r"remote_block_ids\[0\]"),
        (good_params(first_token_id=2**64), "first_token_id"),
        (good_params(remote_num_tokens=2**64), "remote_num_tokens"),
        (good_params(remote_tp_size=2**64), "remote_tp_size"),
        (good_params(first_token_logprobs=[[2**64, -0.5]]), r"first_token_logprobs\[0\]\[0\]"),
        (good_params(remote_port="5600"), "remote_port"),
        (good_params(remote_port=0), "remote_port"),
        (good_params(remote_tp_size=0), "remote_tp_size"),
        (good_params(remote_engine_id=""), "remote_engine_id"),
        (good_params(remote_block_ids="1,2"), "remote_block_ids"),
        ({k: v for k, v in good_params().items() if k != "remote_host"}, "remote_host"),
        (good_params(do_remote_decode=True), "exclusive"),
        (good_params(transfer_token="guess"), "transfer_token"),
        ({k: v for k, v in good_params().items() if k != "transfer_token"}, "transfer_token"),
        ({k: v for k, v in good_params().items() if k != "remote_instance_id"}, "remote_instance_id"),
        ({k: v for k, v in good_params().items() if k != "first_token_id"}, "first_token_id"),
        (good_params(first_token_id=-1), "first_token_id"),
        (good_params(first_token_logprobs=[[5, 0.5]]), r"first_token_logprobs\[0\]\[1\]"),  # a log-prob is <= 0
        (good_params(first_token_logprobs=[[5, float("nan")]]), "first_token_logprobs"),
        (good_params(first_token_logprobs=[5]), "first_token_logprobs"),
        (good_params(first_token_streamed=1), "first_token_streamed"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_params_are_a_clear_error(params, match):
    with pytest.raises(KVParamsError, match=match):
        parse_kv_transfer_params(params)


def test_held_blocks_split_per_group_with_the_window_clipped():
    # Layers 0 and 2 full, 1 and 3 a window of 6; blocks of 4; a prompt of 30 tokens (8 blocks):
    # the decode side receives positions 0..29 and computes 30 (the prefill's first token), whose
    # window starts at 25: entries 6 and 7.
    groups = group_layers((None, 6, None, 6), 2, 8, 4, "float32")
    ids = list(range(100, 108)) + [100, 101]  # the full group's 8 blocks, the sliding group's entries 6, 7
    assert split_held(groups, 30, ids) == [list(range(100, 108)), [100, 101]]  # ids repeat across groups
    with pytest.raises(KVParamsError, match=r"9 remote_block_ids for 30 tokens .*need 10"):
        split_held(groups, 30, ids[:-1])
    with pytest.raises(KVParamsError, match="repeat a block"):
        split_held(groups, 30, ids[:-1] + [100])
    (one,) = group_layers((None, None), 2, 8, 4, "float32")[:1]
    with pytest.raises(KVParamsError, match="repeat a block"):
        split_held((one,), 9, [1, 1, 2])


def test_compat_names_differing_kv_cache_groups():
    spec = FullAttentionSpec(2, 8, 4, 4, "float32")
    hybrid = compat_of(spec, "m", group_layers((None, 6, None, 6), 2, 8, 4, "float32"))
    other = compat_of(spec, "m", group_layers((None, 8, None, 8), 2, 8, 4, "float32"))
    message = hybrid.mismatch(other)
    assert "kv_cache_groups" in message and "window 6 layers 1,3" in message and "window 8 layers 1,3" in message
    assert "kv_cache_groups" in hybrid.mismatch(compat_of(spec, "m"))  # vs one full group


def test_compat_mismatch_names_every_differing_field():
    a = compat_of(FullAttentionSpec(4, 8, 2, 16, "float32"), "qwen3:abc")
    b = compat_of(FullAttentionSpec(4, 8, 3, 16, "bfloat16"), "qwen3:abc")
    assert a.hash() != b.hash() and a.mismatch(a) is None
    message = a.mismatch(b)
    assert "num_layers: local 2 != remote 3" in message and "dtype" in message and "head_size" not in message


def serve_args(*argv: str):
    import argparse

    from kvxfer.entrypoints.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["model-dir", *argv])


def test_serve_reads_the_auth_key_file_and_takes_the_lease_default_from_the_config(tmp_path, monkeypatch):
    from kvxfer.entrypoints.serve import _kv_transfer_config

    key = tmp_path / "kv.key"
    key.write_text("ab" * 16 + "\n")  # e.g. `openssl rand -hex 16 > kv.key`
    config = _kv_transfer_config(serve_args("--role", "decode", "--kv-auth-key-file", str(key)))
    assert config.auth_key == b"ab" * 16
    assert config.lease_seconds == KVTransferConfig(role="decode").lease_seconds
    monkeypatch.setenv("KVXFER_KV_AUTH_KEY_FILE", str(key))
    assert _kv_transfer_config(serve_args("--role", "decode")).auth_key == b"ab" * 16
    key.write_text("short")
    with pytest.raises(SystemExit, match="auth_key must be at least 16 bytes"):
        _kv_transfer_config(serve_args("--role", "decode"))
    with pytest.raises(SystemExit, match="--kv-auth-key-file"):
        _kv_transfer_config(serve_args("--role", "decode", "--kv-auth-key-file", str(tmp_path / "missing")))


def test_unknown_or_stray_fields_are_refused_naming_them():
    with pytest.raises(KVParamsError, match="evil"):
        parse_kv_transfer_params({"do_remote_decode": True, "evil": 1})
    with pytest.raises(KVParamsError, match="evil"):
        parse_kv_transfer_params(good_params(evil=1))
    with pytest.raises(KVParamsError, match="remote_port only valid with do_remote_prefill"):
        parse_kv_transfer_params({"remote_port": 5000})
    assert isinstance(parse_kv_transfer_params({"do_remote_decode": True, "do_remote_prefill": False}),
                      RemoteDecodeParams)
    assert parse_kv_transfer_params({"do_remote_decode": False}) is None
