"""Per-tenant API keys, permissions and rate limits.

- A **keys file** (YAML or JSON) lists tenants: a name (what metrics show), the SHA-256 hashes of
  its keys (never the keys), the models and agents it may use, optional limits, and `admin`.
  `hash_key` / `main_hash_key` make the hashes. Keys from the environment (the gateway's older
  `api_keys_env`) form one more tenant, `default`, with every permission and no limits.
- **`KeyStore`** (in each gateway replica) maps a bearer token to its `Tenant`, comparing the
  token's hash with every stored hash, and re-reads the file when it changes (a bad edit keeps the
  tenants loaded before, with a warning).
- **`RateBook`** is the limit state of all tenants: sliding 60-second windows of admitted requests
  and of tokens used, and concurrency leases. Pure, with the clock passed in.
- **`TenantLimiter`** is the one-replica Serve deployment holding the app's single RateBook, so
  limits hold exactly across all gateway replicas.

Requests flow through `TenantGate` (the gateway's side): `authenticate` (401 without a known key) ->
`forbidden` (a model or agent the tenant may not use: 404, as if it did not exist) / `require_admin`
(403) -> `admit` through the `TenantLimiter` (429 with Retry-After when refused) -> serve ->
`Ticket.done` with the tokens used (always, also on errors and cancellations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import asyncio
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from ray import serve

from cluster.config import AGENT_MODEL_PREFIX
from cluster.dispatch import child_call
from cluster.openai_protocol import OpenAIError
from deployments import metrics

logger = logging.getLogger("ray.serve")

ENV_TENANT = "default"
WINDOW_S = 60.0
LEASE_TTL_S = 900.0
# Concurrency frees up when some request ends, which cannot be known: a short hint.
CONCURRENCY_RETRY_S = 1.0
# How often a RateBook prunes every tenant (the tenant of each call is pruned on every call).
SWEEP_INTERVAL_S = 1.0

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key: what a keys file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# -- the keys file ----------------------------------------------------------------------------------


def _redacted(value: str) -> str:
    # A value that is not a hash may be the key itself, pasted by mistake: never log it whole.
    return f"{value[:4]!r}... ({len(value)} characters)" if len(value) > 4 else f"a {len(value)}-character string"


def _check_hash(v: str) -> str:
    if _HEX64.match(v):
        return v
    if _HEX64.match(v.lower()):
        raise ValueError(f"{v!r} must be lowercase: write it as {v.lower()!r}")
    raise ValueError(
        f"got {_redacted(v)}: must be a SHA-256 hash, 64 lowercase hex characters "
        "(`python -m cluster hash-key -` prints a key's hash)"
    )


def _check_glob(v: str) -> str:
    if not v:
        raise ValueError("must not be empty; use '*' for all")
    if "*" in v[:-1]:
        raise ValueError("'*' may only end an entry, as a prefix glob (e.g. 'tiny-chat:*'), or be the whole entry")
    return v


def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


_Hash = Annotated[StrictStr, AfterValidator(_check_hash)]
_Glob = Annotated[StrictStr, AfterValidator(_check_glob)]
_Positive = Annotated[StrictInt, Field(gt=0)]


class TenantSpec(BaseModel):
    """One tenant of a keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    # Several hashes let a key be rotated: add the new one, move clients, remove the old one.
    key_sha256: Annotated[list[_Hash], BeforeValidator(_one_or_many), Field(min_length=1)]
    models: list[_Glob] = ["*"]
    agents: list[_Glob] = ["*"]
    requests_per_minute: _Positive | None = None
    tokens_per_minute: _Positive | None = None
    max_concurrent_requests: _Positive | None = None
    admin: StrictBool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits and . _ - only, starting with a letter or digit")
        return v


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[TenantSpec]


def _problem(err: dict) -> str:
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "(the document)"
    if err["type"] == "extra_forbidden":
        fields = KeysFile.model_fields if len(err["loc"]) == 1 else TenantSpec.model_fields
        return f"{loc}: unknown field; allowed: {', '.join(fields)}"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if "key_sha256" in err["loc"] and err["type"] == "value_error":
        return f"{loc}: {msg}"  # the message shows what it may: the value may be a key
    return f"{loc}: {msg} (got {err['input']!r})"


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    def __post_init__(self):
        for name in _LIMITS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (got {value!r})")

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in _LIMITS)

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, limits: Limits | Mapping[str, int | None] | None) -> Limits:
        if limits is None:
            return cls()
        return limits if isinstance(limits, Limits) else cls(**limits)


def _allowed(globs: tuple[str, ...], name: str) -> bool:
    return any(name.startswith(g[:-1]) if g.endswith("*") else name == g for g in globs)


@dataclass(frozen=True)
class Tenant:
    """Who a key belongs to and what it may do. Holds no key, nor any hash of one."""

    name: str
    models: tuple[str, ...] = ("*",)
    agents: tuple[str, ...] = ("*",)
    admin: bool = False
    limits: Limits = field(default_factory=Limits)

    def may_use_model(self, name: str) -> bool:
        return _allowed(self.models, name)

    def may_use_agent(self, name: str) -> bool:
        return _allowed(self.agents, name)


def _decode(data: bytes, path: str) -> Any:
    """The document in a keys file's bytes: JSON or YAML by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"keys file {path}: the name must end in .yaml, .yml or .json (that picks the format)")
    try:
        return json.loads(data) if suffix == ".json" else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"keys file {path}: not valid {'JSON' if suffix == '.json' else 'YAML'}: {e}") from None


def parse_keys(doc: Any, path: str, env_hashes: frozenset[str] = frozenset()) -> list[tuple[str, Tenant]]:
    """The (hash, tenant) pairs of a parsed keys document; ValueError naming every problem (the
    file, each field's path, the bad value, what is allowed). `env_hashes`: the hashes of the keys
    from the environment, which the file may not reuse (nor their tenant's name)."""
    problems: list[str] = []
    spec = None
    try:
        spec = KeysFile.model_validate(doc)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
    if spec is not None:
        names: dict[str, int] = {}
        owner: dict[str, str] = {h: f"the keys from the environment (tenant {ENV_TENANT!r})" for h in env_hashes}
        for i, t in enumerate(spec.tenants):
            if t.name in names:
                problems.append(f"tenants[{i}].name: {t.name!r} is already the name of tenants[{names[t.name]}]; tenant names must be unique")
            elif t.name == ENV_TENANT and env_hashes:
                problems.append(f"tenants[{i}].name: {ENV_TENANT!r} is the tenant of the keys from the environment; choose another name")
            names.setdefault(t.name, i)
            for j, h in enumerate(t.key_sha256):
                if h in owner:
                    problems.append(f"tenants[{i}].key_sha256[{j}]: {h!r} is already a key of {owner[h]}; a key belongs to one tenant")
                owner.setdefault(h, f"tenants[{i}] ({t.name!r}) as key_sha256[{j}]")
    if problems:
        raise ValueError(f"invalid keys file {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    pairs = []
    for t in spec.tenants:
        limits = Limits(t.requests_per_minute, t.tokens_per_minute, t.max_concurrent_requests)
        tenant = Tenant(t.name, tuple(t.models), tuple(t.agents), t.admin, limits)
        pairs += [(h, tenant) for h in t.key_sha256]
    return pairs


def load_keys_file(path: str, env_keys: list[str] | None = None) -> list[tuple[str, Tenant]]:
    """Read and check a keys file (`python -m cluster check` can call this); see `parse_keys`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"keys file {path}: cannot read it: {e.strerror or e}") from None
    return parse_keys(_decode(data, path), path, frozenset(hash_key(k) for k in env_keys or []))


def main_hash_key(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`python -m cluster hash-key KEY`: print the key's SHA-256 for a keys file. With `-`, the key
    is read from stdin (keeps it out of the shell history and the process list)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if len(argv) != 1:
        print("usage: python -m cluster hash-key KEY   (or '-' to read the key from stdin)", file=sys.stderr)
        return 2
    key = (stdin.read() if argv[0] == "-" else argv[0]).strip()
    if not key:
        print("hash-key: the key is empty", file=sys.stderr)
        return 2
    print(hash_key(key), file=stdout)
    return 0


# -- the key store (one per gateway replica) ------------------------------------------------------


class KeyStore:
    """Bearer token -> Tenant, from a keys file (re-read when it changes) and keys from the environment.

    `enabled` is true when a keys file is configured (even one with no tenants: that refuses every
    request rather than opening the gateway) or there are environment keys. Replace the file
    atomically (write a temporary file, rename it over the old one) so that no read sees half of it.
    """

    def __init__(
        self,
        keys_file: str | None,
        env_keys: list[str],
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keys_file = keys_file
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._env_hashes = frozenset(hash_key(k.strip()) for k in env_keys if k.strip())
        self._env_pairs = [(h, Tenant(ENV_TENANT, admin=True)) for h in sorted(self._env_hashes)]
        self._file_pairs: list[tuple[str, Tenant]] = []
        self._stat: tuple | None = None  # the file's (inode, size, mtime, ctime) when last read
        self._digest: str | None = None  # the SHA-256 of the content installed
        self._fresh = False  # the file was modified within 2 s of the last read (see _load)
        self._warned: str | None = None  # the problem last warned about: each is warned once
        self._checked_at = clock()
        self._entries = self._build()
        if keys_file is not None:
            # At start a missing or bad file is fatal: the replica does not start, naming the problem.
            self._load(strict=True)

    @property
    def enabled(self) -> bool:
        return self.keys_file is not None or bool(self._env_pairs)

    @property
    def tenants(self) -> dict[str, Tenant]:
        """The current tenants by name."""
        return {t.name: t for _, t in self._env_pairs + self._file_pairs}

    def lookup(self, token: str) -> Tenant | None:
        """The tenant of `token` (surrounding whitespace ignored), or None. Compares with every
        stored hash without stopping at a match, so the time does not tell which key matched."""
        self.maybe_reload()
        digest = hash_key(token.strip()).encode()
        found = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found

    def maybe_reload(self) -> bool:
        """Re-read the keys file if it changed (a stat at most once per reload_interval_s); True when
        new tenants were installed. A broken or deleted file keeps the tenants loaded before."""
        now = self._clock()
        if self.keys_file is None or now - self._checked_at < self.reload_interval_s:
            return False
        self._checked_at = now
        if not self._load(strict=False):
            return False
        logger.info("keys file %s reloaded: %d tenants", self.keys_file, len({t.name for _, t in self._file_pairs}))
        return True

    def _load(self, strict: bool) -> bool:
        """Install the file's tenants when its content changed and is valid. `strict`: raise on a
        missing or bad file, rather than warn (once per problem) and keep the tenants loaded."""
        path = self.keys_file
        kept = len({t.name for _, t in self._file_pairs})
        try:
            st = os.stat(path)
            stat = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if stat == self._stat and not self._fresh:
                return False
            data = Path(path).read_bytes()
        except OSError as e:
            if strict:
                raise ValueError(f"keys file {path}: cannot read it: {e.strerror or e}") from None
            self._warn_once("unreadable", "keys file %s cannot be read (%s); keeping the %d tenants loaded before", path, e.strerror or e, kept)
            return False
        self._stat = stat
        # File times move in clock ticks: a same-size rewrite in the tick of this read would leave
        # the stat as it is now. While the file is that new, its content is compared on each check.
        self._fresh = time.time() - st.st_mtime < 2.0
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            self._warned = None  # back to the content installed (e.g. a deleted file restored)
            return False
        try:
            pairs = parse_keys(_decode(data, path), path, self._env_hashes)
        except ValueError as e:
            if strict:
                raise
            self._warn_once(digest, "%s\nkeeping the %d tenants loaded before", e, kept)
            return False
        self._file_pairs, self._digest, self._warned = pairs, digest, None
        self._entries = self._build()
        return True

    def _build(self) -> list[tuple[bytes, Tenant]]:
        return [(h.encode(), t) for h, t in self._env_pairs + self._file_pairs]

    def _warn_once(self, problem: str, msg: str, *args) -> None:
        if self._warned != problem:
            self._warned = problem
            logger.warning(msg, *args)


# -- rate limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """RateBook.admit's answer. `limit`: the limit that refused (the one to wait longest for, when
    several do); `retry_after_s`: how long until it would admit; `lease`: pass it to `finish`."""

    ok: bool
    limit: str | None = None
    retry_after_s: float = 0.0
    lease: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Usage:
    """One tenant's entries in the window, oldest first."""

    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (finish time, tokens)
    token_sum: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # lease -> expiry; in expiry order (insertion order)

    def prune(self, now: float, window_s: float) -> None:
        cutoff = now - window_s
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.token_sum -= self.tokens.popleft()[1]
        while self.leases:
            lease, expiry = next(iter(self.leases.items()))
            if expiry > now:
                break
            del self.leases[lease]

    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.leases)


class RateBook:
    """The limit state of every tenant: sliding windows of `window_s` (60 s) and concurrency leases.

    - requests_per_minute: a request is admitted while fewer than that many were admitted in the
      last 60 s (refused ones do not count, so retrying does not push the wait further out).
    - tokens_per_minute: while the prompt + completion tokens of the requests that *finished* in the
      last 60 s are fewer than that. Tokens are known only when a request ends, so the requests in
      flight when the limit is reached can overshoot it by their own tokens.
    - max_concurrent_requests: while fewer leases are held. A lease ends with `finish`, or after
      `lease_ttl_s` (a gateway replica that died mid-request must not hold a slot forever).

    An entry is in the window while `now - t < window_s`. `retry_after_s` is exact for the windows
    (when enough entries leave it), CONCURRENCY_RETRY_S for concurrency. Entries are pruned as calls
    come (every tenant at most once per SWEEP_INTERVAL_S) and a tenant with none is dropped, so
    memory follows the last minute's traffic. `now` must not go backwards (a monotonic clock).
    """

    def __init__(self, lease_ttl_s: float = LEASE_TTL_S, window_s: float = WINDOW_S):
        self.lease_ttl_s = lease_ttl_s
        self.window_s = window_s
        self._usage: dict[str, _Usage] = {}
        self._swept = float("-inf")

    def admit(self, tenant: str, limits: Limits | Mapping[str, int | None] | None, now: float) -> Admission:
        limits = Limits.of(limits)
        u = self._get(tenant, now)
        refusals = []
        rpm = limits.requests_per_minute
        if rpm is not None and len(u.requests) >= rpm:
            # Fewer than rpm must be left: wait until the (len - rpm + 1) oldest have left.
            refusals.append(("requests_per_minute", u.requests[len(u.requests) - rpm] + self.window_s - now))
        tpm = limits.tokens_per_minute
        if tpm is not None and u.token_sum >= tpm:
            left = u.token_sum
            for t, n in u.tokens:
                left -= n
                if left < tpm:
                    refusals.append(("tokens_per_minute", t + self.window_s - now))
                    break
        most = limits.max_concurrent_requests
        if most is not None and len(u.leases) >= most:
            refusals.append(("max_concurrent_requests", CONCURRENCY_RETRY_S))
        if refusals:
            limit, retry = max(refusals, key=lambda r: r[1])
            self._keep(tenant, u)
            return Admission(False, limit, retry)
        lease = uuid.uuid4().hex
        u.requests.append(now)
        u.leases[lease] = now + self.lease_ttl_s
        self._keep(tenant, u)
        return Admission(True, lease=lease)

    def finish(self, lease: str | None, tenant: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        """A request ended: free its lease (if still held: an unknown or expired one frees nothing)
        and count its tokens for `tenant` (they count either way)."""
        u = self._get(tenant, now)
        if lease is not None:
            u.leases.pop(lease, None)
        tokens = max(0, int(prompt_tokens or 0)) + max(0, int(completion_tokens or 0))
        if tokens:
            u.tokens.append((now, tokens))
            u.token_sum += tokens
        self._keep(tenant, u)

    def snapshot(self, now: float) -> dict[str, dict[str, int]]:
        """Per tenant with entries: requests admitted and tokens used in the window, leases held."""
        self._sweep(now, force=True)
        return {
            name: {"requests": len(u.requests), "tokens": u.token_sum, "in_flight": len(u.leases)}
            for name, u in sorted(self._usage.items())
        }

    def _get(self, tenant: str, now: float) -> _Usage:
        self._sweep(now)
        u = self._usage.get(tenant) or _Usage()
        u.prune(now, self.window_s)
        return u

    def _keep(self, tenant: str, u: _Usage) -> None:
        if u.empty():
            self._usage.pop(tenant, None)
        else:
            self._usage[tenant] = u

    def _sweep(self, now: float, force: bool = False) -> None:
        if not force and now - self._swept < SWEEP_INTERVAL_S:
            return
        self._swept = now
        for name, u in list(self._usage.items()):
            u.prune(now, self.window_s)
            self._keep(name, u)


@serve.deployment(name="TenantLimiter", num_replicas=1, ray_actor_options={"num_cpus": 0.01}, max_ongoing_requests=10000)
class TenantLimiter:
    """The app's one RateBook, behind a handle: every gateway replica admits through it, so limits
    hold exactly (per request) however many gateway replicas there are. The methods never await
    inside, so each runs whole on the replica's event loop: no locks.

    The cost is one handle call before a request and one after it (`finish`, which the gateway need
    not wait for). One replica is a single point: if it dies, Serve restarts it and every window
    and lease starts from zero (briefly more admitted than the limits); while it is down, calls to
    it fail, and the gateway decides whether that admits (fail open) or refuses.
    """

    def __init__(self, lease_ttl_s: float = LEASE_TTL_S):
        self.book = RateBook(lease_ttl_s=lease_ttl_s)

    async def admit(self, tenant: str, limits: dict[str, int | None]) -> dict[str, Any]:
        """Admission.to_dict(): ok, limit, retry_after_s, lease."""
        return self.book.admit(tenant, limits, time.monotonic()).to_dict()

    async def finish(self, lease: str | None, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.book.finish(lease, tenant, prompt_tokens, completion_tokens, time.monotonic())

    async def snapshot(self) -> dict[str, dict[str, int]]:
        return self.book.snapshot(time.monotonic())


# -- the gateway's side ------------------------------------------------------------------------------

# How long a request waits for the limiter before it is admitted without it (fail open: keys and
# permissions are still checked in every gateway replica; only the shared counters are missed).
LIMITER_TIMEOUT_S = 2.0


class Ticket:
    """One admitted request of a tenant: `done` (once, however the request ends) records the tenant's
    metrics and hands the lease and tokens back to the limiter."""

    def __init__(self, gate: "TenantGate", tenant: Tenant | None, lease: str | None):
        self.gate, self.tenant, self.lease = gate, tenant, lease
        self._done = False

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0, ok: bool = True) -> None:
        if self._done or self.tenant is None:
            return
        self._done = True
        name = self.tenant.name
        metrics.record_tenant_request(name, "ok" if ok else "error")
        metrics.record_tenant_tokens(name, prompt_tokens, completion_tokens)
        if self.gate.limiter is not None and not self.tenant.limits.unlimited:
            # Not awaited: the response is not held for the bookkeeping.
            child_call(self.gate.limiter.finish, self.lease, name, prompt_tokens, completion_tokens)


_LIMIT_WORDS = {
    "requests_per_minute": ("requests", "requests per minute"),
    "tokens_per_minute": ("tokens", "tokens per minute"),
    "max_concurrent_requests": ("requests", "concurrent requests"),
}


class TenantGate:
    """What the gateway asks per request: who is calling (401 otherwise), may they use this model /
    agent / admin route (a model or agent they may not use is a 404, as if it did not exist), and are
    they within their limits (429 with Retry-After otherwise). Disabled (no keys anywhere): every
    request passes as no tenant."""

    def __init__(self, keys_file: str | None, env_keys: list[str], limiter: Any = None):
        self.keys = KeyStore(keys_file, env_keys)
        self.limiter = limiter

    @property
    def enabled(self) -> bool:
        return self.keys.enabled

    def authenticate(self, authorization: str) -> Tenant | None:
        if not self.enabled:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        tenant = self.keys.lookup(token)
        if tenant is None:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    @staticmethod
    def require_admin(tenant: Tenant | None, route: str) -> None:
        if tenant is not None and not tenant.admin:
            metrics.record_tenant_request(tenant.name, "forbidden")
            raise OpenAIError(403, f"This API key may not use the admin route {route}.", code="permission_denied")

    @staticmethod
    def allows(tenant: Tenant | None, what: str) -> bool:
        """May the tenant use this model (or "agent:<name>")? Everyone may without auth."""
        if tenant is None:
            return True
        if what.startswith(AGENT_MODEL_PREFIX):
            return tenant.may_use_agent(what.removeprefix(AGENT_MODEL_PREFIX))
        return tenant.may_use_model(what)

    @staticmethod
    def refused(tenant: Tenant | None) -> None:
        """Count a request for a model or agent the tenant may not use (answered 404)."""
        if tenant is not None:
            metrics.record_tenant_request(tenant.name, "forbidden")

    async def admit(self, tenant: Tenant | None) -> Ticket:
        if tenant is None or tenant.limits.unlimited or self.limiter is None:
            return Ticket(self, tenant, None)
        try:
            admission = await asyncio.wait_for(child_call(self.limiter.admit, tenant.name, tenant.limits.to_dict()), LIMITER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - fail open, see LIMITER_TIMEOUT_S
            logger.warning("tenant limiter unavailable (%s): admitting %s's request without it", type(e).__name__, tenant.name)
            return Ticket(self, tenant, None)
        if not admission["ok"]:
            metrics.record_tenant_request(tenant.name, "limited")
            limit = admission["limit"]
            kind, words = _LIMIT_WORDS[limit]
            value = getattr(tenant.limits, limit)
            retry = admission["retry_after_s"]
            raise OpenAIError(
                429,
                f"Rate limit reached for tenant '{tenant.name}' on {words}: limit {value}. Please try again in {max(1, math.ceil(retry))} s.",
                type=kind,
                param=None,
                code="rate_limit_exceeded",
                retry_after_s=retry,
            )
        return Ticket(self, tenant, admission["lease"])
