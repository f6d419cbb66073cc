"""Settings: HOTSWAP_* environment, .env file, signing keys, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from hotswap import settings as settings_module
from hotswap.errors import ConfigError
from hotswap.settings import HotswapSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HOTSWAP_* variable from the caller's shell, no stray .env."""
    for name in list(os.environ):
        if name.startswith("HOTSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    s = HotswapSettings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.namespace == "hotswap"
    assert s.chunk_bytes == 1024 * 1024 - 64
    assert s.cluster is False
    assert s.signing_keys == [] and s.key_bytes() == []
    assert s.keep_versions == 10


def test_every_field_is_documented() -> None:
    for name, field in HotswapSettings.model_fields.items():
        assert field.description, name


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_REDIS_URL", "redis://redis.internal:7000/2")
    monkeypatch.setenv("HOTSWAP_NAMESPACE", "prod")
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", "2097152")
    monkeypatch.setenv("HOTSWAP_CLUSTER", "true")
    monkeypatch.setenv("HOTSWAP_POLL_INTERVAL", "0.25")
    s = HotswapSettings()
    assert s.redis_url == "redis://redis.internal:7000/2"
    assert s.namespace == "prod"
    assert s.chunk_bytes == 2097152
    assert s.cluster is True
    assert s.poll_interval == 0.25


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "HOTSWAP_NAMESPACE=from-dotenv\nHOTSWAP_SIGNING_KEYS=k1,k2\nHOTSWAP_KEEP_VERSIONS=3\n"
    )
    s = HotswapSettings()
    assert (s.namespace, s.keep_versions) == ("from-dotenv", 3)
    assert s.key_bytes() == [b"k1", b"k2"]
    # The environment wins over .env.
    monkeypatch.setenv("HOTSWAP_NAMESPACE", "from-env")
    assert HotswapSettings().namespace == "from-env"
    # And explicit arguments win over both.
    assert HotswapSettings(namespace="explicit").namespace == "explicit"


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        ("a,b", [b"a", b"b"]),
        (" a , b ,", [b"a", b"b"]),
        ("only", [b"only"]),
        ("", []),
        ("s3cr\u00e9t,x", ["s3cr\u00e9t".encode(), b"x"]),
    ],
)
def test_signing_keys_split_on_commas(
    monkeypatch: pytest.MonkeyPatch, value: str, keys: list[bytes]
) -> None:
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", value)
    assert HotswapSettings().key_bytes() == keys


def test_signing_keys_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", "topsecret1,topsecret2")
    s = HotswapSettings()
    assert "topsecret" not in repr(s) and "topsecret" not in str(s)
    assert s.key_bytes()[0] == b"topsecret1"


def test_signing_keys_as_a_list() -> None:
    assert HotswapSettings(signing_keys=["a", "b"]).key_bytes() == [b"a", b"b"]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("HOTSWAP_CHUNK_BYTES", "100", "Input should be greater than or equal to 4096"),
        ("HOTSWAP_CHUNK_BYTES", "lots", "Input should be a valid integer"),
        ("HOTSWAP_POLL_INTERVAL", "0", "Input should be greater than 0"),
        ("HOTSWAP_CLUSTER", "maybe", "Input should be a valid boolean"),
        ("HOTSWAP_RETRY_ATTEMPTS", "0", "Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("HOTSWAP_").lower()
    with pytest.raises(ValidationError) as raw:
        HotswapSettings()
    assert raw.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ConfigError) as e:
        settings_module.load()
    assert str(e.value).startswith(f"invalid settings: {name}={value!r}: {problem}")
    assert "\n" not in str(e.value)


def test_load_reports_every_bad_value_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", "100")
    monkeypatch.setenv("HOTSWAP_HEARTBEAT_TTL", "-1")
    with pytest.raises(ConfigError) as e:
        settings_module.load()
    assert str(e.value) == (
        "invalid settings: HOTSWAP_CHUNK_BYTES='100': Input should be greater than or equal "
        "to 4096; HOTSWAP_HEARTBEAT_TTL='-1': Input should be greater than 0"
    )


def test_load_never_echoes_key_material() -> None:
    with pytest.raises(ConfigError) as e:
        settings_module.load(signing_keys=["good", 12345])
    assert "12345" not in str(e.value)
    assert str(e.value).startswith("invalid settings: HOTSWAP_SIGNING_KEYS: ")


def test_load_returns_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_NAMESPACE", "n1")
    assert settings_module.load(keep_versions=2).model_dump(
        include={"namespace", "keep_versions"}
    ) == {
        "namespace": "n1",
        "keep_versions": 2,
    }


def test_bad_namespace_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_NAMESPACE", "has space")
    with pytest.raises(ConfigError) as e:
        HotswapSettings()
    assert str(e.value) == (
        "invalid namespace 'has space': use 1-128 characters from A-Z a-z 0-9 . _ -"
    )


# -- which .env, and names no setting has (issue 15) ------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own warnings (they are logged once per process)."""
    monkeypatch.setattr(settings_module, "_warned", set())


def test_dotenv_is_found_in_a_parent_up_to_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    deep = project / "src" / "app"
    deep.mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / ".env").write_text("HOTSWAP_NAMESPACE=from-project\n")
    monkeypatch.chdir(deep)
    assert settings_module.find_env_file() == project / ".env"
    assert HotswapSettings().namespace == "from-project"
    assert HotswapSettings().env_file == str(project / ".env")  # which file was read
    # The nearest wins.
    (deep / ".env").write_text("HOTSWAP_NAMESPACE=from-deep\n")
    assert HotswapSettings().namespace == "from-deep"
    # Never above the project's root.
    (project / ".env").unlink()
    (deep / ".env").unlink()
    (tmp_path / ".env").write_text("HOTSWAP_NAMESPACE=outside\n")
    assert settings_module.find_env_file() is None
    assert HotswapSettings().namespace == "hotswap"


def test_hotswap_env_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "conf" / "prod.env"
    named.parent.mkdir()
    named.write_text("HOTSWAP_NAMESPACE=prod\n")
    (tmp_path / ".env").write_text("HOTSWAP_NAMESPACE=local\n")
    monkeypatch.setenv("HOTSWAP_ENV_FILE", str(named))
    assert HotswapSettings().namespace == "prod"
    assert HotswapSettings(env_file=str(tmp_path / ".env")).namespace == "local"
    monkeypatch.setenv("HOTSWAP_ENV_FILE", "")  # empty: no file at all
    assert HotswapSettings().namespace == "hotswap"
    monkeypatch.setenv("HOTSWAP_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError) as e:
        settings_module.load()
    assert str(e.value) == (
        f"HOTSWAP_ENV_FILE={str(tmp_path / 'missing.env')!r}: no such file; fix or unset it"
    )
    # An explicit _env_file still wins (tests and embedders pass None).
    assert HotswapSettings(_env_file=None).namespace == "hotswap"  # type: ignore[call-arg]


def test_a_misspelled_variable_is_a_warning_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    monkeypatch.setenv("HOTSWAP_REDIS_ULR", "redis://elsewhere:6379/0")
    monkeypatch.setenv("HOTSWAP_WHATEVER_ELSE_ENTIRELY", "1")
    monkeypatch.setenv("HOTSWAP_REDIS_SERVER", "/usr/bin/redis-server")  # a setting now
    with caplog.at_level("WARNING", logger="hotswap.settings"):
        s = settings_module.load()
        settings_module.load()  # once per process, not once per load
    assert s.redis_url == "redis://127.0.0.1:6379/0"  # the misspelling set nothing
    assert s.redis_server == "/usr/bin/redis-server"
    assert [r.getMessage() for r in caplog.records] == [
        "HOTSWAP_REDIS_ULR (in the environment) is not a hotswap setting: "
        "did you mean HOTSWAP_REDIS_URL?",
        "HOTSWAP_WHATEVER_ELSE_ENTIRELY (in the environment) is not a hotswap setting: "
        "README, Configuration, lists them",
    ]


def test_a_misspelled_name_in_the_dotenv_file_is_a_warning_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    (tmp_path / ".env").write_text("HOTSWAP_NAMESPCE=prod\nOTHER_TOOL=1\n")
    with caplog.at_level("WARNING", logger="hotswap.settings"):
        assert HotswapSettings().namespace == "hotswap"
    assert [r.getMessage() for r in caplog.records] == [
        f"HOTSWAP_NAMESPCE (in {tmp_path / '.env'}) is not a hotswap setting: "
        "did you mean HOTSWAP_NAMESPACE?"
    ]


def test_the_cli_prints_the_warning_on_stderr(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    env["HOTSWAP_REDIS_ULR"] = "redis://x:1/0"
    env["HOTSWAP_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing there: exit 3, quickly
    env["HOTSWAP_RETRY_ATTEMPTS"] = "1"
    p = subprocess.run(
        [sys.executable, "-m", "publisher", "status", "m"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 3
    assert p.stderr.startswith(
        "HOTSWAP_REDIS_ULR (in the environment) is not a hotswap setting: "
        "did you mean HOTSWAP_REDIS_URL?\n"
    )


def test_the_cli_run_from_a_subfolder_reads_the_projects_dotenv(
    tmp_path: Path, settings: HotswapSettings
) -> None:
    """The issue's path: `.env` in the project, `hotswap` run from a folder below it."""
    import subprocess
    import sys

    import torch

    from publisher.publisher import Publisher

    with Publisher("m", settings=settings) as pub:
        pub.publish({"w": torch.ones(4)})
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / ".env").write_text(f"HOTSWAP_REDIS_URL={settings.redis_url}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    p = subprocess.run(
        [sys.executable, "-m", "publisher", "log", "m", "--json"],
        env=env,
        cwd=project / "scripts",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (p.returncode, p.stderr) == (0, "")
    assert [row["version"] for row in json.loads(p.stdout)] == [1]
