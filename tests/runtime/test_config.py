"""Config: defaults, `EMBXFER_*` overrides and validation that names the field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from embxfer import Config
from embxfer.control import records as rec
from embxfer.control.records import MAX_BLOCKS
from embxfer.control.ring import slot_bytes_for

DEFAULTS = {
    "block_size": 128,
    "default_alloc_tokens": 8192,
    "language_pool_blocks": 1024,
    "output_budget_bytes": 8 << 30,
    "max_resume_tokens": 0,
    "staging_bytes": 32 << 20,
    "staging_depth": 2,
    "max_segments_per_message": 64,
    "max_metadata_bytes": 1024,
    "heartbeat_interval_s": 0.5,
    "peer_timeout_s": 10.0,
    "request_timeout_s": 120.0,
    "admission_timeout_s": 480.0,
    "cache_bytes": 0,
    "ring_slots": 1024,
    "ring_slot_bytes": 0,
    "shm_prefix": "embxfer",
}


def test_defaults():
    config = Config()
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(config)} == DEFAULTS
    assert config.default_alloc_blocks == 64


def test_records_decode_by_default_with_a_default_configurations_limits():
    """`records.decode` without limits is bounded by what a default-configured language
    rank holds: the two defaults are one."""
    assert Config().limits == rec.DEFAULT_LIMITS
    assert (rec.DEFAULT_POOL_BLOCKS, rec.DEFAULT_MAX_SEGMENTS) == (DEFAULTS["language_pool_blocks"],
                                                                    DEFAULTS["max_segments_per_message"])


def test_from_env_with_empty_env_is_defaults():
    assert Config.from_env(env={}) == Config()


def test_from_env_ignores_unrelated_variables():
    env = {"BLOCK_SIZE": "7", "EMBXFER": "x", "OTHER_EMBXFER_BLOCK_SIZE": "3"}
    assert Config.from_env(env=env) == Config()


def test_every_field_reads_its_env_var():
    env = {
        "EMBXFER_BLOCK_SIZE": "64",
        "EMBXFER_DEFAULT_ALLOC_TOKENS": "1000",
        "EMBXFER_LANGUAGE_POOL_BLOCKS": "44",
        "EMBXFER_OUTPUT_BUDGET_BYTES": "1000000",
        "EMBXFER_MAX_SEGMENTS_PER_MESSAGE": "8",
        "EMBXFER_CACHE_BYTES": "4096",
        "EMBXFER_MAX_RESUME_TOKENS": "512",
        "EMBXFER_STAGING_BYTES": "1048576",
        "EMBXFER_STAGING_DEPTH": "3",
        "EMBXFER_HEARTBEAT_INTERVAL_S": "0.25",
        "EMBXFER_PEER_TIMEOUT_S": "5",
        "EMBXFER_REQUEST_TIMEOUT_S": "30.5",
        "EMBXFER_RING_SLOTS": "256",
        "EMBXFER_RING_SLOT_BYTES": " 8192 ",
    }
    config = Config.from_env(env=env)
    assert config.block_size == 64
    assert config.default_alloc_tokens == 1000
    assert config.language_pool_blocks == 44
    assert config.output_budget_bytes == 1_000_000
    assert config.max_segments_per_message == 8
    assert config.cache_bytes == 4096
    assert config.max_resume_tokens == 512
    assert config.staging_bytes == 1 << 20
    assert config.staging_depth == 3
    assert config.heartbeat_interval_s == 0.25
    assert config.peer_timeout_s == 5.0 and isinstance(config.peer_timeout_s, float)
    assert config.request_timeout_s == 30.5
    assert config.ring_slots == 256
    assert config.ring_slot_bytes == 8192
    assert config.default_alloc_blocks == 16  # 1000 / 64 rounded up


def test_keyword_overrides_win_over_env():
    config = Config.from_env(env={"EMBXFER_BLOCK_SIZE": "64"}, block_size=32, ring_slots=8)
    assert config.block_size == 32 and config.ring_slots == 8


def test_from_env_reads_process_environment(monkeypatch):
    monkeypatch.setenv("EMBXFER_STAGING_DEPTH", "5")
    assert Config.from_env().staging_depth == 5


@pytest.mark.parametrize(
    "tokens, block_size, blocks",
    [(8192, 128, 64), (1000, 128, 8), (1024, 128, 8), (1025, 128, 9), (1, 128, 1), (7, 1, 7), (2000, 1024, 2)],
)
def test_default_alloc_blocks_rounds_up(tokens, block_size, blocks):
    config = Config(default_alloc_tokens=tokens, block_size=block_size)
    assert config.default_alloc_blocks == blocks
    assert config.default_alloc_blocks * block_size >= tokens


INT_FIELDS = [
    "block_size",
    "default_alloc_tokens",
    "language_pool_blocks",
    "output_budget_bytes",
    "staging_bytes",
    "staging_depth",
    "max_segments_per_message",
    "ring_slots",
]
SECONDS_FIELDS = ["heartbeat_interval_s", "peer_timeout_s", "request_timeout_s", "admission_timeout_s"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True, None])
def test_bad_positive_int_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config(**{field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("raw", ["0", "-3", "abc", "1.5", ""])
def test_bad_positive_int_from_env_names_the_field(field, raw):
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config.from_env(env={"EMBXFER_" + field.upper(): raw})


@pytest.mark.parametrize("field", SECONDS_FIELDS)
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_seconds_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config(**{field: value})


@pytest.mark.parametrize("field", SECONDS_FIELDS)
@pytest.mark.parametrize("raw", ["0", "-0.5", "soon", "nan", "inf", "-inf"])
def test_bad_seconds_from_env_names_the_field(field, raw):
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config.from_env(env={"EMBXFER_" + field.upper(): raw})


@pytest.mark.parametrize("value", [1025, 2048, 1 << 20])
def test_block_size_above_1024_rejected(value):
    with pytest.raises(ValueError, match="config.block_size") as info:
        Config(block_size=value)
    assert "1024" in str(info.value)


@pytest.mark.parametrize("value", [1, 1024])
def test_block_size_limits_accepted(value):
    assert Config(block_size=value).block_size == value


@pytest.mark.parametrize("field", ["max_resume_tokens", "cache_bytes", "ring_slot_bytes"])
@pytest.mark.parametrize("value", [-1, 1.5, "0", True])
def test_bad_zero_or_more_ints(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config(**{field: value})


def test_ring_slot_must_hold_the_largest_record():
    """A slot too small for the largest record the pool produces is refused at start-up
    (it used to crash a rank at run time); 0 derives the size from the pool."""
    with pytest.raises(ValueError, match="config.ring_slot_bytes=64: expected a multiple of 64 from 3200"):
        Config(ring_slot_bytes=64)
    with pytest.raises(ValueError, match="config.ring_slot_bytes"):
        Config.from_env(env={"EMBXFER_RING_SLOT_BYTES": "64"})
    assert Config().slot_bytes == 4096
    big = Config(language_pool_blocks=100_000, block_size=1)
    assert big.slot_bytes >= 3 * 100_000  # a fully fragmented allocation of the whole pool fits
    assert Config(ring_slot_bytes=8192).slot_bytes == 8192


@pytest.mark.parametrize("blocks", [MAX_BLOCKS + 1, 1 << 24])
def test_pool_beyond_the_wire_limit_is_refused_naming_it(blocks):
    """The configuration and the records share one limit: a pool a record's block list
    cannot name is refused at start-up, not by the first receiver of its allocation."""
    with pytest.raises(ValueError, match=rf"config.language_pool_blocks={blocks}: expected at most {MAX_BLOCKS} "
                                         r"\(records.MAX_BLOCKS"):
        Config(language_pool_blocks=blocks)
    with pytest.raises(ValueError, match="config.language_pool_blocks"):
        Config.from_env(env={"EMBXFER_LANGUAGE_POOL_BLOCKS": str(blocks)})


def test_the_largest_accepted_pools_largest_record_encodes_decodes_and_fits_its_slot():
    """Block size 1 and every other block of the largest pool the configuration accepts,
    in an order with no runs: the largest DECISION there is. It encodes, decodes with the
    limits the configuration gives its receivers, and fits the ring slot derived from
    them; so does a TRANSFER of the most segments."""
    config = Config(language_pool_blocks=MAX_BLOCKS, block_size=1, max_segments_per_message=1024)
    worst = np.concatenate((np.arange(MAX_BLOCKS - 1, -1, -2), np.arange(0, MAX_BLOCKS, 2)))
    decision = rec.Decisions.of(0, [(1, 3, rec.DecisionAction.RESUME, 0, 0, MAX_BLOCKS, 0, b"h" * rec.MAX_HASH_BYTES,
                                     worst)])
    transfer = rec.Transfer(0, -1, 0, 1, tuple(rec.Segment(i, 0, 0, 1, 1, 0) for i in range(1024)))
    for record in (decision, transfer):
        data = rec.encode(record)
        assert rec.decode(data, config.limits) == record
        assert len(data) <= rec.max_record_bytes(config.limits)
        assert slot_bytes_for(len(data)) <= config.slot_bytes
    assert len(rec.encode(decision)) == rec.max_record_bytes(config.limits)  # the bound is tight
    assert np.array_equal(rec.decode(rec.encode(decision), config.limits).decisions()[0].blocks, worst)


def test_a_ring_larger_than_its_segment_limit_is_refused():
    assert Config(language_pool_blocks=MAX_BLOCKS, block_size=1).ring_slots == 1024  # 3 MiB slots: 3 GiB
    with pytest.raises(ValueError, match=r"config.ring_slots=2048 x \d+-byte slots .*MAX_SEGMENT_BYTES"):
        Config(language_pool_blocks=MAX_BLOCKS, block_size=1, ring_slots=2048)
    with pytest.raises(ValueError, match=r"config.ring_slot_bytes=16777280: expected a multiple of 64 from"):
        Config(ring_slot_bytes=(1 << 24) + 64)


@pytest.mark.parametrize("slots", [1, (1 << 20) + 1])
def test_ring_slots_the_ring_refuses_are_refused(slots):
    with pytest.raises(ValueError, match=f"config.ring_slots={slots}: expected 2.."):
        Config(ring_slots=slots)


def test_peer_timeout_must_span_three_heartbeats():
    with pytest.raises(ValueError, match=r"config.peer_timeout_s=2.9: expected at least 3 x "
                                         r"config.heartbeat_interval_s=1.0"):
        Config(heartbeat_interval_s=1.0, peer_timeout_s=2.9)
    with pytest.raises(ValueError, match="config.peer_timeout_s"):
        Config(heartbeat_interval_s=1.0, peer_timeout_s=2.0)  # twice was accepted once: one late beat killed
    with pytest.raises(ValueError, match="config.peer_timeout_s"):
        Config.from_env(env={"EMBXFER_HEARTBEAT_INTERVAL_S": "4"})  # default peer timeout 10 < 12
    assert Config(heartbeat_interval_s=1.0, peer_timeout_s=3.0).peer_timeout_s == 3.0


@pytest.mark.parametrize("field", SECONDS_FIELDS)
@pytest.mark.parametrize("value", [1e-6, 0.0009, 1e9, 7 * 86400 + 1, 10**400])
def test_timeouts_outside_a_millisecond_to_a_week_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"config.{field}=.*: expected a finite number of seconds from 0.001 "
                                         r"\(1 ms\) to 604800 \(1 week\)"):
        Config(**{field: value, **({"peer_timeout_s": 604800.0} if field == "heartbeat_interval_s" else {})})
    with pytest.raises(ValueError, match=f"config.{field}"):
        Config.from_env(env={"EMBXFER_" + field.upper(): str(float(value)) if value != 10**400 else "1e400"})


def test_timeouts_at_the_bounds_are_accepted():
    config = Config(heartbeat_interval_s=0.001, peer_timeout_s=0.003, request_timeout_s=7 * 86400)
    assert (config.heartbeat_interval_s, config.request_timeout_s) == (0.001, 604800)


@pytest.mark.parametrize("raw", ["1_0", "١٠", "1٠", "0x10", "1e3", "10.0", "1 0", "--1", "1" * 31])
def test_env_integers_are_plain_ascii_decimals(raw):
    with pytest.raises(ValueError, match=r"config.ring_slots: EMBXFER_RING_SLOTS=.*: expected a decimal integer"):
        Config.from_env(env={"EMBXFER_RING_SLOTS": raw})


@pytest.mark.parametrize("raw", ["1_0.5", "١.٥", "nan", "NaN", "inf", "-inf", "infinity", "0x1p3", "1e400",
                                 "1.5s", ".", "e3", ""])
def test_env_seconds_are_plain_ascii_finite_decimals(raw):
    with pytest.raises(ValueError, match=r"config.request_timeout_s: EMBXFER_REQUEST_TIMEOUT_S=.*: expected a "
                                         r"(finite|decimal) number"):
        Config.from_env(env={"EMBXFER_REQUEST_TIMEOUT_S": raw})


def test_env_error_names_field_variable_value_and_expectation():
    with pytest.raises(ValueError) as info:
        Config.from_env(env={"EMBXFER_BLOCK_SIZE": "1_0"})
    assert str(info.value) == "config.block_size: EMBXFER_BLOCK_SIZE='1_0': expected a decimal integer"


@pytest.mark.parametrize("raw, value", [(" 64 ", 64), ("+64", 64), ("064", 64), ("\t64\n", 64)])
def test_good_env_integers_still_parse(raw, value):
    assert Config.from_env(env={"EMBXFER_BLOCK_SIZE": raw}).block_size == value


@pytest.mark.parametrize("raw, value", [("30", 30.0), (" 30.5 ", 30.5), ("3e1", 30.0), ("3E+1", 30.0), (".5e2", 50.0),
                                        ("30.", 30.0), ("+30", 30.0)])
def test_good_env_seconds_still_parse(raw, value):
    config = Config.from_env(env={"EMBXFER_REQUEST_TIMEOUT_S": raw})
    assert config.request_timeout_s == value and type(config.request_timeout_s) is float


def test_a_negative_env_integer_is_refused_by_the_fields_range():
    with pytest.raises(ValueError, match=r"config.block_size=-3: expected a positive integer"):
        Config.from_env(env={"EMBXFER_BLOCK_SIZE": "-3"})


def test_replace_validates():
    config = Config()
    assert config.replace(block_size=64).block_size == 64
    with pytest.raises(ValueError, match="config.block_size"):
        config.replace(block_size=0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().block_size = 3  # type: ignore[misc]


def test_describe_lists_every_field_and_value():
    text = Config(block_size=64).describe()
    lines = text.splitlines()
    assert "(derived: 4096)" in text
    assert len(lines) == len(DEFAULTS)
    for name in DEFAULTS:
        assert any(line.split()[0] == name for line in lines), name
    assert any(line.split() == ["block_size", "=", "64"] for line in lines)


@pytest.mark.parametrize("prefix", ["", "has-dash", "a" * 25, "sl/ash"])
def test_bad_shm_prefix_names_the_field(prefix):
    with pytest.raises(ValueError, match="config.shm_prefix"):
        Config(shm_prefix=prefix)


def test_a_staging_buffer_too_small_for_one_row_is_refused_when_the_endpoint_is_made():
    """Config cannot know D, K and the dtype; the endpoint can: a staging_bytes that holds
    no row (here 48 bytes for a 32-byte row, which staging aligns) is a ValueError naming
    it when the endpoint is made, not in the engine loop at the first send."""
    from embxfer.runtime.local import LocalCluster

    with pytest.raises(ValueError, match=r"config.staging_bytes=48: too small for one token of D=16"):
        LocalCluster(config=Config(staging_bytes=48), dim=16)
