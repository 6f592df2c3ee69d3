"""Safe settings: the registry of `EMBXFER_*` variables and the warning for unknown ones,
the runtime's validated variables (link port, bind and advertise hosts), timeouts,
devices and the memory a configuration needs; every error names what was wrong."""

from __future__ import annotations

import math
import os
import re
import socket
import warnings
from dataclasses import fields

import pytest
import torch

from embxfer import Config
from embxfer.control.deadlines import check_timeout
from embxfer.control.records import MAX_BLOCKS
from embxfer.runtime import config as config_module
from embxfer.runtime import settings
from embxfer.runtime.config import check_device, check_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fresh_warnings(monkeypatch):
    """A process that has warned of nothing yet."""
    monkeypatch.setattr(settings, "_warned", set())


# ------------------------------------------------------------------- the registry


def test_the_registry_holds_every_config_field_and_runtime_variable():
    known = settings.variables()
    for f in fields(Config):
        assert known["EMBXFER_" + f.name.upper()] == f"Config.{f.name}"
    for name in ("EMBXFER_RENDEZVOUS", "EMBXFER_NODE_ID", "EMBXFER_BIND_HOST", "EMBXFER_LINK_PORT",
                 "EMBXFER_ADVERTISE_HOST", "EMBXFER_SECRET", "EMBXFER_SECRET_FILE", "EMBXFER_ENGINE",
                 "EMBXFER_SHM_PREFIX", "EMBXFER_SPAWNED_CHILD"):
        assert name in known
    assert list(known) == sorted(known)


def test_every_embxfer_variable_named_in_the_repository_is_known_or_test_only():
    """A variable read somewhere but missing from the registry would be warned about as
    a typo; this scan keeps the two in step."""
    found: dict[str, str] = {}
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"
                             and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(directory, name)
            if not name.endswith((".py", ".md", ".sh", ".toml", ".txt", ".yml", ".yaml")) \
                    or path == os.path.abspath(__file__):  # this file spells a typo on purpose
                continue
            with open(path, encoding="utf-8", errors="replace") as source:
                for variable in re.findall(r"\bEMBXFER_[A-Z0-9_]*[A-Z0-9]\b", source.read()):
                    found.setdefault(variable, os.path.relpath(path, ROOT))
    assert "EMBXFER_RENDEZVOUS" in found  # the scan sees the sources
    known = settings.variables()
    placeholders = {"EMBXFER_X"}  # "field `x` reads EMBXFER_X" in the docs
    stray = {name: where for name, where in found.items()
             if name not in known and name not in placeholders and not name.startswith(settings.TEST_PREFIX)}
    assert not stray


# ------------------------------------------------------------- unknown variables


def test_a_misspelled_variable_warns_naming_the_right_one(fresh_warnings):
    with pytest.warns(settings.UnknownVariableWarning, match="EMBXFER_PEER_TIMOUT_S is set, but embxfer reads no "
                                                            "such variable: did you mean EMBXFER_PEER_TIMEOUT_S"):
        Config.from_env(env={"EMBXFER_PEER_TIMOUT_S": "30"})


def test_unknown_variables_warn_once_per_process(fresh_warnings):
    env = {"EMBXFER_BLOK_SIZE": "64", "EMBXFER_STAGING_DEPTH": "3"}
    with pytest.warns(settings.UnknownVariableWarning, match="did you mean EMBXFER_BLOCK_SIZE") as caught:
        assert settings.warn_unknown_variables(env) == ["EMBXFER_BLOK_SIZE"]
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert settings.warn_unknown_variables(env) == ["EMBXFER_BLOK_SIZE"]  # still reported, not warned
        Config.from_env(env=env)


def test_process_environment_is_checked(fresh_warnings, monkeypatch):
    monkeypatch.setenv("EMBXFER_REQEST_TIMEOUT_S", "5")
    with pytest.warns(settings.UnknownVariableWarning, match="did you mean EMBXFER_REQUEST_TIMEOUT_S"):
        assert Config.from_env() == Config()


@pytest.mark.parametrize("env", [
    {"EMBXFER_TEST_SEED": "1", "EMBXFER_TEST_PEER_TIMEOUT_S": "3", "EMBXFER_TEST_RING_PREFIX": "x"},
    {name: "1" for name in ("EMBXFER_RENDEZVOUS", "EMBXFER_NODE_ID", "EMBXFER_SECRET_FILE", "EMBXFER_ENGINE")},
    {"EMBXFER": "x", "OTHER_EMBXFER_BLOCK_SIZE": "3", "BLOCK_SIZE": "7"},
])
def test_known_and_test_only_variables_never_warn(fresh_warnings, env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert settings.warn_unknown_variables(env) == []


def test_a_lower_case_name_and_a_name_like_nothing_get_their_own_hints(fresh_warnings):
    with pytest.warns(settings.UnknownVariableWarning) as caught:
        settings.warn_unknown_variables({"embxfer_block_size": "64", "EMBXFER_COLOUR": "blue"})
    messages = sorted(str(w.message) for w in caught)
    assert messages[0].startswith("EMBXFER_COLOUR is set, but embxfer reads no such variable: embxfer ignores it")
    assert messages[1] == ("embxfer_block_size is set, but embxfer reads no such variable: did you mean "
                           "EMBXFER_BLOCK_SIZE? (names are case-sensitive)")


# -------------------------------------------------------------------- link port


@pytest.mark.parametrize("raw, port", [("29600", 29600), (" 1 ", 1), ("65535", 65535), ("", None), ("  ", None)])
def test_link_port_parses(raw, port):
    assert settings.link_port({"EMBXFER_LINK_PORT": raw}) == port


def test_link_port_unset_is_none():
    assert settings.link_port({}) is None


@pytest.mark.parametrize("raw, expected", [
    ("abc", "expected a decimal integer"), ("1_0", "expected a decimal integer"),
    ("٢٩٦٠٠", "expected a decimal integer"), ("2960.0", "expected a decimal integer"),
    ("0", "expected a TCP port in 1..65535"), ("65536", "expected a TCP port in 1..65535"),
    ("-1", "expected a TCP port in 1..65535"),
])
def test_bad_link_port_names_the_variable(raw, expected):
    with pytest.raises(ValueError) as info:
        settings.link_port({"EMBXFER_LINK_PORT": raw})
    assert str(info.value).startswith(f"EMBXFER_LINK_PORT={raw!r}: {expected}")


def test_link_port_leaves_room_for_every_process_of_the_node():
    assert settings.link_port({"EMBXFER_LINK_PORT": "65532"}, ports=4) == 65532
    with pytest.raises(ValueError, match=r"EMBXFER_LINK_PORT='65533': .* room for 4 processes"):
        settings.link_port({"EMBXFER_LINK_PORT": "65533"}, ports=4)


# ---------------------------------------------------------- bind and advertise hosts


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("raw, host", [("127.0.0.1", "127.0.0.1"), (" 127.0.0.1 ", "127.0.0.1"),
                                       ("localhost", "localhost"), ("lo", "lo"), ("", None)])
def test_bind_host_accepts_this_machines_addresses_names_and_interfaces(raw, host):
    assert settings.bind_host({"EMBXFER_BIND_HOST": raw}) == host
    assert settings.bind_host({}) is None


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("raw", ["::1", "[::1]"])
def test_bind_host_accepts_ipv6(raw):
    assert settings.bind_host({"EMBXFER_BIND_HOST": raw}) == "::1"


def test_bind_host_accepts_this_machines_own_name():
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, 0, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        pytest.skip("this machine's own name does not resolve")
    assert settings.bind_host({"EMBXFER_BIND_HOST": name}) == name


@pytest.mark.parametrize("raw, expected", [
    ("192.0.2.1", "not an address of this machine (binding to it failed: 192.0.2.1: "),  # TEST-NET-1
    ("no-such-host.invalid", "expected an IP address, host name or interface name of this machine; the name "
                             "does not resolve"),
    ("10.0.0.256", "expected an IP address, host name or interface name of this machine; the name does not"),
])
def test_bad_bind_host_names_the_variable_and_value(raw, expected):
    with pytest.raises(ValueError) as info:
        settings.bind_host({"EMBXFER_BIND_HOST": raw})
    assert str(info.value).startswith(f"EMBXFER_BIND_HOST={raw!r}: {expected}")


@pytest.mark.parametrize("raw", ["0.0.0.0", "::", "[::]", "*"])
def test_wildcard_bind_host_needs_an_advertised_address(raw):
    with pytest.raises(ValueError) as info:
        settings.bind_host({"EMBXFER_BIND_HOST": raw})
    assert str(info.value) == (f"EMBXFER_BIND_HOST={raw!r} listens on every interface, and peers cannot dial a "
                               "wildcard: expected the address other nodes reach this node on, or set "
                               "EMBXFER_ADVERTISE_HOST too")
    assert settings.bind_host({"EMBXFER_BIND_HOST": raw, "EMBXFER_ADVERTISE_HOST": "10.1.2.3"}) == raw.strip("[]")


@pytest.mark.parametrize("raw, host", [("10.1.2.3", "10.1.2.3"), ("node-7.example.com", "node-7.example.com"),
                                       ("[fd00::7]", "fd00::7"), (" gpu_host ", "gpu_host"), ("", None)])
def test_advertise_host_parses(raw, host):
    assert settings.advertise_host({"EMBXFER_ADVERTISE_HOST": raw}) == host
    assert settings.advertise_host({}) is None


@pytest.mark.parametrize("raw, expected", [("0.0.0.0", "peers cannot dial a wildcard"),
                                           ("::", "peers cannot dial a wildcard"),
                                           ("tcp://10.0.0.1:5000", "expected an IP address or a host name"),
                                           ("bad host", "expected an IP address or a host name"),
                                           ("-lead.example", "expected an IP address or a host name")])
def test_bad_advertise_host_names_the_variable(raw, expected):
    with pytest.raises(ValueError) as info:
        settings.advertise_host({"EMBXFER_ADVERTISE_HOST": raw})
    assert str(info.value).startswith(f"EMBXFER_ADVERTISE_HOST={raw!r}: {expected}")


# ---------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("value", [0.001, 1, 120.0, 7 * 86400])
def test_check_timeout_accepts_a_millisecond_to_a_week(value):
    assert check_timeout("timeout_s", value) == float(value)


@pytest.mark.parametrize("value", [1e-6, 0, -1.0, math.nan, math.inf, 1e9, 10**400, True, "5", None])
def test_check_timeout_refuses_the_rest_naming_it(value):
    with pytest.raises(ValueError) as info:
        check_timeout("timeout_s", value)
    assert str(info.value) == (f"timeout_s={value!r}: expected a finite number of seconds from 0.001 (1 ms) to "
                               "604800 (1 week)")


# ----------------------------------------------------------------------- devices


def test_check_device_cpu():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda_says_so(device):
    with pytest.raises(ValueError) as info:
        check_device(device)
    assert str(info.value) == f"device={str(device)!r}: no CUDA device is visible (torch.cuda.is_available() is False)"


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cuda_index_past_the_device_count(two_gpus):
    assert check_device("cuda:0") == torch.device("cuda", 0)
    assert check_device("cuda") == torch.device("cuda", 1)  # the current device, with its index
    with pytest.raises(ValueError) as info:
        check_device("cuda:2")
    assert str(info.value) == "device='cuda:2': only 2 CUDA devices visible (cuda:0 .. cuda:1)"


@pytest.mark.parametrize("device, expected", [
    ("meta", "embxfer does not run on meta devices"), ("mps", "embxfer does not run on mps devices"),
    ("gpu", "expected 'cpu', 'cuda' or 'cuda:N'"), ("cuda:x", "expected 'cpu', 'cuda' or 'cuda:N'"),
    (True, "expected 'cpu', 'cuda' or 'cuda:N'"), (1.5, "expected 'cpu', 'cuda' or 'cuda:N'"),
])
def test_unknown_device_types_are_refused(device, expected):
    with pytest.raises(ValueError, match=re.escape(f"device={device!r}: {expected}")):
        check_device(device)


# ------------------------------------------------------------------------ memory


def test_the_default_configuration_fits_and_its_size_is_returned():
    config = Config()
    bytes_per_token = 64 * 4 + 4 + 12 + 2 * 64 * 4
    assert check_memory(config, "cpu", 64, torch.float32, 2, "language") == \
        1024 * 128 * bytes_per_token + 2 * (32 << 20)
    assert check_memory(config, "cpu", 64, torch.float32, 2, "encoder") == 2 * (32 << 20)  # no pool


def test_a_pool_beyond_this_machines_memory_is_refused():
    config = Config(language_pool_blocks=MAX_BLOCKS, block_size=1024)  # 2**30 tokens: 32 TiB at dim 8192 fp32
    with pytest.raises(ValueError, match=r"a language rank on cpu needs \d+ bytes \(32.0 TiB\): "
                                         r"config.language_pool_blocks=1048576 x config.block_size=1024 tokens x "
                                         r"32784 bytes a token .* free \(MemAvailable in /proc/meminfo\): .* "
                                         r"lower config.language_pool_blocks"):
        check_memory(config, "cpu", 8192, torch.float32, 0, "language")
    assert check_memory(config, "cpu", 8192, torch.float32, 0, "encoder") == 2 * (32 << 20)


def test_staging_beyond_this_machines_memory_is_refused():
    config = Config(staging_bytes=1 << 46)
    with pytest.raises(ValueError, match=r"an? encoder rank on cpu needs .*config.staging_depth=2 x "
                                         r"config.staging_bytes=70368744177664 = .* of staging .*lower "
                                         r"config.staging_bytes or config.staging_depth"):
        check_memory(config, "cpu", 64, torch.bfloat16, 0, "encoder")


def test_memory_message_names_fields_and_both_numbers(monkeypatch):
    monkeypatch.setattr(config_module, "_free_bytes", lambda device: (1 << 30, "MemAvailable in /proc/meminfo"))
    config = Config(language_pool_blocks=4096, staging_depth=2, staging_bytes=1 << 20)
    with pytest.raises(ValueError) as info:
        check_memory(config, "cpu", 1024, torch.bfloat16, 0, "language")
    assert str(info.value) == (
        "a language rank on cpu needs 1084227584 bytes (1.0 GiB): config.language_pool_blocks=4096 x "
        "config.block_size=128 tokens x 2064 bytes a token (dim 1024, torch.bfloat16, 0 deepstack layers) = "
        "1082130432 bytes (1.0 GiB) of pool + config.staging_depth=2 x config.staging_bytes=1048576 = 2097152 "
        "bytes (2.0 MiB) of staging (one peer); cpu has 1073741824 bytes (1.0 GiB) free (MemAvailable in "
        "/proc/meminfo): expected at most that, lower config.language_pool_blocks")


def test_memory_on_cuda_is_checked_against_its_free_memory(two_gpus, monkeypatch):
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 8 << 30, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    config = Config(language_pool_blocks=65536)  # 8.4 M tokens x 7184 bytes: 56 GiB
    with pytest.raises(ValueError, match=r"a language rank on cuda:1 needs .* cuda:1 has 8589934592 bytes \(8.0 GiB\) "
                                         r"free \(torch.cuda.mem_get_info\)"):
        check_memory(config, "cuda:1", 3584, torch.bfloat16, 0, "language")
    assert asked == [torch.device("cuda", 1)]
    assert check_memory(Config(), "cuda", 3584, torch.bfloat16, 0, "language") < 8 << 30


@pytest.mark.parametrize("kwargs, expected", [
    ({"dim": 0}, "dim=0: expected an integer >= 1"),
    ({"deepstack_layers": -1}, "deepstack_layers=-1: expected an integer >= 0"),
    ({"dtype": torch.int8}, "dtype=torch.int8: expected one of"),
    ({"role": "vision"}, "role='vision': expected 'language' or 'encoder'"),
])
def test_check_memory_arguments_are_checked(kwargs, expected):
    arguments = {"dim": 64, "dtype": torch.float32, "deepstack_layers": 0, "role": "language", **kwargs}
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_memory(Config(), "cpu", **arguments)
