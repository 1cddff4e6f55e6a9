"""Per-tenant API keys and rate limits (cluster/tenants.py): the keys file, the key store and its
hot reload, and the RateBook's windows, all with a fake clock and no Ray cluster."""

from __future__ import annotations

import io
import json
import logging
import os
from types import SimpleNamespace

import pytest

from cluster import tenants
from cluster.tenants import (
    Admission,
    KeyStore,
    Limits,
    RateBook,
    Tenant,
    hash_key,
    main_hash_key,
)

KEY_A, KEY_B, KEY_C = "sk-team-a-1", "sk-team-a-2", "sk-team-b"
ENV_KEY = "sk-from-env"


def h(key: str) -> str:
    return hash_key(key)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(path, tenants_list: list[dict]) -> None:
    # Atomically, as an operator should: a reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tenants": tenants_list}) if path.suffix == ".json" else _yaml(tenants_list))
    os.replace(tmp, path)


def _yaml(tenants_list: list[dict]) -> str:
    import yaml

    return yaml.safe_dump({"tenants": tenants_list})


TEAM_A = {
    "name": "team-a",
    "key_sha256": [h(KEY_A), h(KEY_B)],
    "models": ["tiny-chat", "tiny-chat:*"],
    "agents": ["safe_response"],
    "requests_per_minute": 60,
    "tokens_per_minute": 10000,
    "max_concurrent_requests": 4,
}
TEAM_B = {"name": "team-b", "key_sha256": h(KEY_C), "admin": True}


def problems(doc, env_keys=()) -> str:
    with pytest.raises(ValueError) as e:
        tenants.parse_keys(doc, "keys.yaml", frozenset(h(k) for k in env_keys))
    return str(e.value)


# -- keys ------------------------------------------------------------------------------------------


def test_hash_key_is_sha256_hex():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_hash_key_command_takes_the_key_or_reads_it_from_stdin(capsys):
    out = io.StringIO()
    assert main_hash_key(["abc"], stdout=out) == 0
    assert out.getvalue() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    out = io.StringIO()
    assert main_hash_key(["-"], stdin=io.StringIO("abc\n"), stdout=out) == 0  # `echo abc | ...`
    assert out.getvalue() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
    assert main_hash_key(["-"], stdin=io.StringIO("\n"), stdout=io.StringIO()) == 2
    assert main_hash_key([], stdout=io.StringIO()) == 2
    assert main_hash_key(["a", "b"], stdout=io.StringIO()) == 2
    assert "usage: python -m cluster hash-key KEY" in capsys.readouterr().err


def test_lookup_finds_the_tenant_of_each_key_and_none_for_others(tmp_path):
    path = tmp_path / "keys.yaml"
    write(path, [TEAM_A, TEAM_B])
    store = KeyStore(str(path), [ENV_KEY, " ", ""])
    a = store.lookup(KEY_A)
    assert a == Tenant("team-a", ("tiny-chat", "tiny-chat:*"), ("safe_response",), False, Limits(60, 10000, 4))
    assert store.lookup(KEY_B) is a  # rotation: both hashes belong to team-a
    assert store.lookup(f"  {KEY_C} ") == Tenant("team-b", ("*",), ("*",), True, Limits())  # a single string hash
    assert store.lookup(ENV_KEY) == Tenant("default", ("*",), ("*",), True, Limits())
    assert store.lookup(ENV_KEY).limits.unlimited and not a.limits.unlimited
    for wrong in ("sk-team-a", "", h(KEY_A), KEY_A + "x"):
        assert store.lookup(wrong) is None
    assert sorted(store.tenants) == ["default", "team-a", "team-b"]
    assert store.enabled


def test_lookup_compares_every_stored_hash(tmp_path, monkeypatch):
    """No early exit: as many comparisons for the first key as for a wrong one."""
    path = tmp_path / "keys.yaml"
    write(path, [TEAM_A, TEAM_B])
    store = KeyStore(str(path), [ENV_KEY])
    calls = []
    real = tenants.hmac.compare_digest
    monkeypatch.setattr(tenants.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    for token in (ENV_KEY, KEY_A, KEY_C, "wrong"):
        calls.clear()
        store.lookup(token)
        assert len(calls) == 4  # 1 env hash + 2 of team-a + 1 of team-b


def test_enabled_with_env_keys_or_a_keys_file_even_an_empty_one(tmp_path):
    assert not KeyStore(None, []).enabled
    assert not KeyStore(None, [" ", ""]).enabled
    env = KeyStore(None, ["k1", "k2"])
    assert env.enabled and env.lookup("k2").name == "default" and env.lookup("k3") is None
    path = tmp_path / "keys.json"
    write(path, [])
    empty = KeyStore(str(path), [])
    # A configured file with no tenants refuses everyone: it must not open the gateway.
    assert empty.enabled and empty.lookup("anything") is None and empty.tenants == {}


def test_models_and_agents_globs():
    t = Tenant("t", models=("tiny-chat", "llama-*"), agents=())
    assert t.may_use_model("tiny-chat") and t.may_use_model("llama-") and t.may_use_model("llama-3-8b")
    assert not t.may_use_model("tiny-chat:adapter") and not t.may_use_model("tiny-chat-b") and not t.may_use_model("llama")
    assert not t.may_use_agent("safe_response")
    everything = Tenant("e")
    assert everything.may_use_model("anything") and everything.may_use_agent("any")
    adapters = Tenant("a", models=("tiny-chat:*",), agents=("safe_*", "self_consistency"))
    assert adapters.may_use_model("tiny-chat:sql") and not adapters.may_use_model("tiny-chat")
    assert adapters.may_use_agent("safe_response") and adapters.may_use_agent("self_consistency")
    assert not adapters.may_use_agent("multi_step_reasoning")


# -- keys file errors ------------------------------------------------------------------------------


def test_a_bad_hash_names_the_field_and_never_prints_the_value_whole():
    doc = {"tenants": [TEAM_B, {"name": "x", "key_sha256": [h("ok"), "sk-secret-key-pasted"]}]}
    assert problems(doc) == (
        "invalid keys file keys.yaml:\n"
        "  - tenants[1].key_sha256[1]: got 'sk-s'... (20 characters): must be a SHA-256 hash, 64 lowercase hex "
        "characters (`python -m cluster hash-key -` prints a key's hash)"
    )
    upper = h("k").upper()
    assert problems({"tenants": [{"name": "x", "key_sha256": upper}]}) == (
        f"invalid keys file keys.yaml:\n  - tenants[0].key_sha256[0]: {upper!r} must be lowercase: write it as {h('k')!r}"
    )
    assert "tenants[0].key_sha256: Value should have at least 1 item after validation, not 0 (got [])" in problems({"tenants": [{"name": "x", "key_sha256": []}]})
    assert "tenants[0].key_sha256: required field is missing" in problems({"tenants": [{"name": "x"}]})


def test_duplicate_names_and_hashes_are_errors():
    doc = {"tenants": [TEAM_A, {**TEAM_B, "name": "team-a"}, {"name": "c", "key_sha256": [h("c"), h(KEY_B)]}]}
    assert problems(doc) == (
        "invalid keys file keys.yaml:\n"
        "  - tenants[1].name: 'team-a' is already the name of tenants[0]; tenant names must be unique\n"
        f"  - tenants[2].key_sha256[1]: {h(KEY_B)!r} is already a key of tenants[0] ('team-a') as key_sha256[1]; a key belongs to one tenant"
    )
    # The keys from the environment are the tenant "default": the file may not reuse either.
    env = problems({"tenants": [{"name": "default", "key_sha256": h(ENV_KEY)}]}, env_keys=[ENV_KEY])
    assert env == (
        "invalid keys file keys.yaml:\n"
        "  - tenants[0].name: 'default' is the tenant of the keys from the environment; choose another name\n"
        f"  - tenants[0].key_sha256[0]: {h(ENV_KEY)!r} is already a key of the keys from the environment (tenant 'default'); a key belongs to one tenant"
    )
    # Without environment keys, "default" is a name like any other.
    assert tenants.parse_keys({"tenants": [{"name": "default", "key_sha256": h("d")}]}, "k.yaml")[0][1].name == "default"


def test_unknown_fields_and_bad_values_name_the_field_the_value_and_what_is_allowed():
    doc = {
        "tenants": [
            {"name": "a", "key_sha256": h("a"), "rpm": 5},
            {"name": "b c", "key_sha256": h("b"), "requests_per_minute": 0, "tokens_per_minute": "100", "max_concurrent_requests": True},
            {"name": "d", "key_sha256": h("d"), "models": ["tiny*chat", ""], "admin": "yes"},
        ],
        "version": 2,
    }
    assert problems(doc).splitlines() == [
        "invalid keys file keys.yaml:",
        (
            "  - tenants[0].rpm: unknown field; allowed: name, key_sha256, models, agents, requests_per_minute, "
            "tokens_per_minute, max_concurrent_requests, admin"
        ),
        "  - tenants[1].name: use letters, digits and . _ - only, starting with a letter or digit (got 'b c')",
        "  - tenants[1].requests_per_minute: Input should be greater than 0 (got 0)",
        "  - tenants[1].tokens_per_minute: Input should be a valid integer (got '100')",
        "  - tenants[1].max_concurrent_requests: Input should be a valid integer (got True)",
        "  - tenants[2].models[0]: '*' may only end an entry, as a prefix glob (e.g. 'tiny-chat:*'), or be the whole entry (got 'tiny*chat')",
        "  - tenants[2].models[1]: must not be empty; use '*' for all (got '')",
        "  - tenants[2].admin: Input should be a valid boolean (got 'yes')",
        "  - version: unknown field; allowed: tenants",
    ]
    assert problems(None) == "invalid keys file keys.yaml:\n  - (the document): Input should be a valid dictionary or instance of KeysFile (got None)"


def test_file_format_follows_the_extension(tmp_path):
    good = {"tenants": [TEAM_B]}
    (tmp_path / "k.json").write_text(json.dumps(good))
    (tmp_path / "k.yml").write_text(_yaml([TEAM_B]))
    assert [t.name for _, t in tenants.load_keys_file(str(tmp_path / "k.json"))] == ["team-b"]
    assert [t.name for _, t in tenants.load_keys_file(str(tmp_path / "k.yml"))] == ["team-b"]
    (tmp_path / "k.txt").write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"k.txt: the name must end in .yaml, .yml or .json"):
        tenants.load_keys_file(str(tmp_path / "k.txt"))
    (tmp_path / "bad.json").write_text("{tenants: []}")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"):
        tenants.load_keys_file(str(tmp_path / "bad.json"))
    (tmp_path / "bad.yaml").write_text("tenants: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML: "):
        tenants.load_keys_file(str(tmp_path / "bad.yaml"))
    # At start a missing or bad file stops the replica, naming the problem.
    with pytest.raises(ValueError, match=r"keys file .*missing.yaml: cannot read it: No such file or directory"):
        KeyStore(str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML"):
        KeyStore(str(tmp_path / "bad.yaml"), [])


# -- hot reload ------------------------------------------------------------------------------------


def test_a_changed_file_is_read_again_after_the_interval(tmp_path, monkeypatch):
    path = tmp_path / "keys.yaml"
    write(path, [{"name": "t", "key_sha256": h("old")}])
    clock = Clock()
    store = KeyStore(str(path), [], reload_interval_s=1.0, clock=clock)
    stats = []
    monkeypatch.setattr(tenants, "os", SimpleNamespace(stat=lambda p: stats.append(p) or os.stat(p)))
    assert store.lookup("old").name == "t"
    # Same size, same name, same second: only the key differs.
    write(path, [{"name": "t", "key_sha256": h("new")}])
    clock.t += 0.999
    assert store.lookup("old").name == "t" and store.lookup("new") is None  # not yet checked
    assert stats == []
    clock.t += 0.001
    assert store.lookup("new").name == "t"
    assert store.lookup("old") is None
    assert len(stats) == 1  # once per interval, however many lookups
    clock.t += 1.0
    assert not store.maybe_reload()  # unchanged content: nothing to install
    assert len(stats) == 2


def test_a_broken_or_deleted_file_keeps_the_tenants_and_warns_once(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    write(path, [{"name": "t", "key_sha256": h("old")}])
    clock = Clock()
    store = KeyStore(str(path), [ENV_KEY], clock=clock)
    caplog.set_level(logging.WARNING, logger="ray.serve")

    write(path, [{"name": "t", "key_sha256": "not-a-hash"}])
    for _ in range(3):
        clock.t += 1.0
        assert not store.maybe_reload()
        assert store.lookup("old").name == "t" and store.lookup(ENV_KEY).name == "default"
    assert [r.getMessage() for r in caplog.records] == [
        (
            f"invalid keys file {path}:\n"
            "  - tenants[0].key_sha256[0]: got 'not-'... (10 characters): must be a SHA-256 hash, 64 lowercase hex "
            "characters (`python -m cluster hash-key -` prints a key's hash)\n"
            "keeping the 1 tenants loaded before"
        )
    ]
    caplog.clear()

    path.unlink()
    for _ in range(3):
        clock.t += 1.0
        assert not store.maybe_reload()
        assert store.lookup("old").name == "t"
    assert [r.getMessage() for r in caplog.records] == [
        f"keys file {path} cannot be read (No such file or directory); keeping the 1 tenants loaded before"
    ]
    caplog.clear()

    # Fixed: the new tenants are installed, and a later problem is warned about again.
    write(path, [{"name": "u", "key_sha256": h("fixed")}])
    clock.t += 1.0
    assert store.maybe_reload()
    assert store.lookup("fixed").name == "u" and store.lookup("old") is None
    path.write_text("tenants: [")
    clock.t += 1.0
    assert not store.maybe_reload() and store.lookup("fixed").name == "u"
    assert len(caplog.records) == 1 and "not valid YAML" in caplog.records[0].getMessage()


# -- rate limits -----------------------------------------------------------------------------------


def test_requests_per_minute_refuses_at_the_bound_with_the_exact_wait():
    book, limits = RateBook(), {"requests_per_minute": 3}
    for t in (0.0, 10.0, 20.0):
        assert book.admit("a", limits, t).ok
    assert book.admit("a", limits, 30.0) == Admission(False, "requests_per_minute", 30.0, None)
    # Refused requests do not count: the wait is still until the first one leaves the window.
    assert book.admit("a", limits, 59.5) == Admission(False, "requests_per_minute", 0.5, None)
    ok = book.admit("a", limits, 60.0)  # the request of t=0 has left the window
    assert ok.ok and ok.limit is None and ok.retry_after_s == 0.0 and len(ok.lease) == 32
    assert book.admit("a", limits, 60.0) == Admission(False, "requests_per_minute", 10.0, None)
    # Other tenants have their own windows.
    assert book.admit("b", limits, 60.0).ok
    # A lowered limit (a reloaded keys file) waits until enough have left: 20, 60 must go below 1.
    assert book.admit("a", {"requests_per_minute": 1}, 61.0) == Admission(False, "requests_per_minute", 59.0, None)


def test_tokens_per_minute_counts_finished_tokens_and_waits_until_enough_leave():
    book, limits = RateBook(), {"tokens_per_minute": 100}
    for t, (prompt, completion) in ((0.0, (4, 6)), (5.0, (10, 0)), (10.0, (79, 0))):
        a = book.admit("a", limits, t)
        assert a.ok
        book.finish(a.lease, "a", prompt, completion, t)
    assert book.snapshot(10.0) == {"a": {"requests": 3, "tokens": 99, "in_flight": 0}}
    a = book.admit("a", limits, 11.0)  # 99 < 100: admitted, and may overshoot by its own tokens
    assert a.ok
    book.finish(a.lease, "a", 1, 10, 12.0)  # 110
    # 110 - 10 (t=0) = 100 is not below 100; - 10 (t=5) = 90 is: wait until t=5 leaves, at 65.
    assert book.admit("a", limits, 20.0) == Admission(False, "tokens_per_minute", 45.0, None)
    assert book.admit("a", limits, 60.0) == Admission(False, "tokens_per_minute", 5.0, None)
    assert book.admit("a", limits, 65.0).ok


def test_max_concurrent_requests_refuses_at_the_bound_until_a_lease_ends():
    book, limits = RateBook(), {"max_concurrent_requests": 2}
    first, second = book.admit("a", limits, 0.0), book.admit("a", limits, 0.0)
    assert first.ok and second.ok and first.lease != second.lease
    assert book.admit("a", limits, 1.0) == Admission(False, "max_concurrent_requests", 1.0, None)
    book.finish(second.lease, "a", 0, 0, 2.0)
    assert book.admit("a", limits, 2.0).ok
    assert book.admit("a", limits, 2.0) == Admission(False, "max_concurrent_requests", 1.0, None)


def test_several_refusing_limits_report_the_longest_wait():
    book = RateBook()
    limits = Limits(requests_per_minute=2, tokens_per_minute=10, max_concurrent_requests=1)
    a = book.admit("a", limits, 0.0)
    book.finish(a.lease, "a", 5, 5, 30.0)
    held = book.admit("a", limits, 40.0)
    assert held == Admission(False, "tokens_per_minute", 50.0, None)  # tokens refuse first
    assert book.admit("a", Limits(requests_per_minute=2, max_concurrent_requests=1), 40.0).ok
    # Now: concurrency (1 s), requests (until t=0 leaves: 20 s) and tokens (until t=30 leaves: 50 s).
    assert book.admit("a", limits, 40.0) == Admission(False, "tokens_per_minute", 50.0, None)
    assert book.admit("a", Limits(requests_per_minute=2, max_concurrent_requests=1), 40.0) == Admission(False, "requests_per_minute", 20.0, None)
    assert book.admit("a", Limits(max_concurrent_requests=1), 40.0) == Admission(False, "max_concurrent_requests", 1.0, None)


def test_a_lease_expires_after_its_ttl_and_finishing_it_late_frees_nothing():
    book, limits = RateBook(lease_ttl_s=900.0), {"max_concurrent_requests": 1}
    lost = book.admit("a", limits, 0.0)  # its gateway replica died: never finished
    assert book.admit("a", limits, 899.5) == Admission(False, "max_concurrent_requests", 1.0, None)
    fresh = book.admit("a", limits, 900.0)
    assert fresh.ok
    # The lost lease is gone: finishing it now frees nothing (fresh still holds the slot) but its
    # tokens count; an unknown lease alike.
    book.finish(lost.lease, "a", 3, 4, 901.0)
    book.finish("no-such-lease", "a", 10, 0, 902.0)
    book.finish(None, "a", 0, 5, 903.0)
    assert book.admit("a", limits, 903.0) == Admission(False, "max_concurrent_requests", 1.0, None)
    assert book.snapshot(903.0) == {"a": {"requests": 1, "tokens": 22, "in_flight": 1}}
    # A lease of another tenant is not this tenant's: finishing it under "b" frees nothing of "a".
    book.finish(fresh.lease, "b", 0, 0, 904.0)
    assert book.snapshot(904.0)["a"]["in_flight"] == 1
    book.finish(fresh.lease, "a", 0, 0, 905.0)
    assert book.snapshot(905.0) == {"a": {"requests": 1, "tokens": 22, "in_flight": 0}}


def test_windows_slide_and_tenants_with_nothing_left_are_dropped():
    book = RateBook()
    a = book.admit("a", None, 0.0)
    book.finish(a.lease, "a", 2, 3, 1.0)
    book.admit("b", {"requests_per_minute": 5}, 0.5)  # b keeps its lease (in flight)
    assert book.snapshot(1.0) == {
        "a": {"requests": 1, "tokens": 5, "in_flight": 0},
        "b": {"requests": 1, "tokens": 0, "in_flight": 1},
    }
    assert book.snapshot(59.999) == book.snapshot(1.0)
    assert book.snapshot(60.0) == {"a": {"requests": 0, "tokens": 5, "in_flight": 0}, "b": {"requests": 1, "tokens": 0, "in_flight": 1}}
    assert book.snapshot(61.0) == {"b": {"requests": 0, "tokens": 0, "in_flight": 1}}
    assert set(book._usage) == {"b"}
    # Calls for other tenants sweep idle ones out too (memory follows the last minute's traffic).
    book.finish(None, "c", 1, 0, 100.0)
    book.admit("d", None, 200.0)
    assert set(book._usage) == {"b", "d"}
    # A call that leaves a tenant nothing stores nothing.
    empty = RateBook()
    empty.finish(None, "x", 0, 0, 0.0)
    assert empty._usage == {}


def test_limits_must_be_positive_integers():
    assert Limits.of({"requests_per_minute": 5}) == Limits(5, None, None)
    assert Limits.of(None) == Limits() and Limits().unlimited
    for bad in (0, -1, 1.5, True, "5"):
        with pytest.raises(ValueError, match="requests_per_minute must be a positive integer or None"):
            Limits(requests_per_minute=bad)
    with pytest.raises(TypeError):
        Limits.of({"rpm": 5})
    assert Limits(1, 2, 3).to_dict() == {"requests_per_minute": 1, "tokens_per_minute": 2, "max_concurrent_requests": 3}


async def test_the_limiter_deployment_answers_plain_dicts():
    """Its methods, called on the class itself (through a handle they take and return the same)."""
    limiter = tenants.TenantLimiter.func_or_class()
    limits = Limits(max_concurrent_requests=1).to_dict()
    first = await limiter.admit("a", limits)
    assert first["ok"] is True and first["limit"] is None and first["retry_after_s"] == 0.0 and len(first["lease"]) == 32
    assert await limiter.admit("a", limits) == {"ok": False, "limit": "max_concurrent_requests", "retry_after_s": 1.0, "lease": None}
    await limiter.finish(first["lease"], "a", 3, 4)
    assert await limiter.snapshot() == {"a": {"requests": 1, "tokens": 7, "in_flight": 0}}
    opts = tenants.TenantLimiter
    assert (opts.name, opts.num_replicas, opts.ray_actor_options["num_cpus"], opts.max_ongoing_requests) == ("TenantLimiter", 1, 0.01, 10000)


def test_a_same_size_rewrite_in_the_same_clock_tick_is_still_seen(tmp_path, monkeypatch):
    """File times move in ticks: an in-place rewrite right after a read can leave the stat as it
    was. While the file is that new (mtime within 2 s), the store compares content as well; an
    older file with an unchanged stat is not read at all."""
    path = tmp_path / "keys.yaml"
    write(path, [{"name": "t", "key_sha256": h("old")}])
    clock = Clock()
    store = KeyStore(str(path), [], clock=clock)
    frozen = os.stat(path)
    monkeypatch.setattr(tenants, "os", SimpleNamespace(stat=lambda p: frozen))  # the rewrite below changes no stat field
    path.write_text(_yaml([{"name": "t", "key_sha256": h("new")}]))
    clock.t += 1.0
    assert store.maybe_reload() and store.lookup("new").name == "t"

    old = tmp_path / "old.yaml"
    write(old, [{"name": "t", "key_sha256": h("old")}])
    os.utime(old, (frozen.st_atime - 3600, frozen.st_mtime - 3600))
    monkeypatch.undo()
    stale = KeyStore(str(old), [], clock=clock)
    frozen_old = os.stat(old)
    monkeypatch.setattr(tenants, "os", SimpleNamespace(stat=lambda p: frozen_old))
    reads = []
    real_read = tenants.Path.read_bytes
    monkeypatch.setattr(tenants.Path, "read_bytes", lambda self: (reads.append(self) if self == old else None) or real_read(self))
    old.write_text(_yaml([{"name": "t", "key_sha256": h("new")}]))
    clock.t += 1.0
    assert not stale.maybe_reload() and reads == [] and stale.lookup("old").name == "t"


def test_tenant_metrics_are_recorded_by_name_with_their_tags(monkeypatch):
    """deployments/metrics.py's tenant counters (the gateway records them): never the key."""
    import collections

    from deployments import metrics

    recorded = []

    class Metric:
        def __init__(self, name):
            self.name = name

        def inc(self, value, tags):
            recorded.append((self.name, value, tags))

    monkeypatch.setattr(metrics, "_objects", {name: Metric(name) for name in metrics.METRICS})
    monkeypatch.setattr(metrics, "recording_errors", collections.Counter())
    metrics.record_tenant_request("team-a", "limited")
    metrics.record_tenant_tokens("team-a", 12, 0)
    metrics.record_tenant_tokens("team-b", 3, 4)
    assert recorded == [
        ("tandem_tenant_requests_total", 1, {"tenant": "team-a", "status": "limited"}),
        ("tandem_tenant_tokens_total", 12, {"tenant": "team-a", "kind": "prompt"}),
        ("tandem_tenant_tokens_total", 3, {"tenant": "team-b", "kind": "prompt"}),
        ("tandem_tenant_tokens_total", 4, {"tenant": "team-b", "kind": "completion"}),
    ]
    assert metrics.METRICS["tandem_tenant_requests_total"][:1] + metrics.METRICS["tandem_tenant_requests_total"][2:] == ("counter", ("tenant", "status"), None)
    assert metrics.METRICS["tandem_tenant_tokens_total"][2] == ("tenant", "kind")
    assert "| tandem_tenant_tokens_total | counter | tenant, kind |" in metrics.__doc__
