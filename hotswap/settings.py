"""All configuration, read from ``HOTSWAP_*`` environment variables and ``.env``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hotswap.errors import ConfigError
from hotswap.manifest import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from hotswap.redact import redact

MiB = 1024 * 1024


class HotswapSettings(BaseSettings):
    """Settings shared by publishers, agents and the CLI.

    Every field reads ``HOTSWAP_<FIELD>`` from the environment (then ``.env``)
    unless given as a keyword; each field's ``description`` says what it does.
    Library code takes a settings object and never reads the environment
    itself: only entry points (``Agent``, ``Publisher``, the CLI) build one
    when none is passed.

    Args:
        **values: fields to set, overriding the environment.

    Raises:
        pydantic.ValidationError: a field or ``HOTSWAP_*`` variable is invalid.
            ``hotswap.settings.load`` raises ``ConfigError`` instead, with one
            line naming the variable.

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
        description="Redis URL: redis://, rediss:// (TLS), unix://; user:password@ for ACL users.",
    )
    cluster: bool = Field(default=False, description="Connect with the Redis Cluster client.")
    namespace: str = Field(
        default="hotswap", description="Prefix of every key, to share one Redis."
    )
    chunk_bytes: int = Field(
        default=1 * MiB,
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
    staging_keep_bytes: int = Field(
        default=64 * MiB,
        ge=0,
        description="Host staging memory an agent of a CPU model keeps between versions "
        "(fetches of updates up to this size land in memory already faulted in); 0 keeps none.",
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

    def key_bytes(self) -> list[bytes]:
        """The signing keys as bytes, the publisher's first."""
        return [key.get_secret_value().encode() for key in self.signing_keys]


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
                value = redact(value)  # its password never
            shown = "" if secret or isinstance(value, dict) else f"={value!r:.60}"
            name = field.split(".")[0].upper()
            problems.append(f"HOTSWAP_{name}{shown}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from e
