"""Settings logic, with no server: required settings, unknown variables, secrets from files,
the configuration file and `outbox config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field, ValidationError
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsConfigDict

from outbox.cli import main
from outbox.settings import Settings
from outbox.settings_registry import (
    OTHER_VARIABLES,
    documented_classes,
    installed_classes,
    settings_of,
    unknown_file_keys,
    unknown_variables,
    validation_messages,
)
from outbox.settings_report import MASK, default_of, mask, origins
from outbox.settings_sources import ConfigurationError, load_config_file
from outbox_app.settings import AppSettings

DB_URL = "postgresql+psycopg://app:s3cret@db.example.com:5432/app"
REQUIRED = {"OUTBOX_DATABASE_URL": DB_URL, "OUTBOX_KAFKA_BOOTSTRAP": "kafka.example.com:9093"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OUTBOX_ (or example) variable of the surrounding shell reaches these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(("OUTBOX_", "AUDIT_LOG_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_a_missing_database_url_names_its_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OUTBOX_KAFKA_BOOTSTRAP", "kafka:9092")
    with pytest.raises(ValidationError) as caught:
        Settings()
    [message] = validation_messages(caught.value, [Settings])
    assert message.startswith("missing setting OUTBOX_DATABASE_URL (")
    assert "OUTBOX_DATABASE_URL_FILE" in message


def test_an_invalid_value_names_its_variable_and_hides_a_secret(
        clean_env: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("OUTBOX_TOPIC_PARTITIONS", "three")
    with pytest.raises(ValidationError) as caught:
        Settings()
    [message] = validation_messages(caught.value, [Settings])
    assert message.startswith("invalid setting OUTBOX_TOPIC_PARTITIONS = 'three': ")


# Addresses a process listens on, not servers it reaches: the loopback is the safe default.
LISTEN_ADDRESSES = {"metrics_host"}


def test_no_address_or_credential_defaults_to_the_local_stack() -> None:
    for name, s in settings_of(installed_classes()).items():
        default = default_of(s)
        if name in LISTEN_ADDRESSES:
            assert default == "127.0.0.1", name
            continue
        assert "127.0.0.1" not in str(default) and "localhost" not in str(default), name
        if s.secret:
            assert default in (PydanticUndefined, None, "") or not str(default), name


def test_every_setting_has_a_description() -> None:
    undocumented = [name for name, s in settings_of(documented_classes()).items()
                    if not s.field.description]
    assert undocumented == []


def test_a_misspelt_variable_is_an_error_naming_the_closest(
        clean_env: pytest.MonkeyPatch) -> None:
    settings = settings_of(installed_classes())
    environ = {"OUTBOX_DATABSE_URL": DB_URL, "OUTBOX_TOPIC_PREFIX": "orders",
               "OUTBOX_TOPIC_PREFIX_FILE": "/run/secrets/prefix", "OUTBOX_ZZZZ": "1",
               "PATH": "/usr/bin"}
    assert unknown_variables(settings, environ) == [
        "OUTBOX_DATABSE_URL: unknown setting; did you mean OUTBOX_DATABASE_URL?",
        "OUTBOX_TOPIC_PREFIX_FILE: OUTBOX_TOPIC_PREFIX is not a secret, so it is not read "
        "from a file; set OUTBOX_TOPIC_PREFIX itself",
        "OUTBOX_ZZZZ: unknown setting",
    ]


def test_every_package_and_tool_variable_is_known() -> None:
    settings = settings_of(installed_classes())
    environ = dict.fromkeys(OTHER_VARIABLES, "x") | {
        "OUTBOX_ES_URL": "http://es:9200", "OUTBOX_API_KEYS_FILE": "/k",
        "OUTBOX_PROJECTOR_BATCH_SIZE": "5", "OUTBOX_DATABASE_URL_FILE": "/db",
        "outbox_redis_url": "redis://r:6379/0"}
    assert unknown_variables(settings, environ) == []


class _WithTable(Settings):
    """A package's settings with a table of client properties (as the Kafka ones)."""

    model_config = SettingsConfigDict(env_nested_delimiter="__")

    client_properties: dict[str, str] = Field(default_factory=dict, description="passed on")


def test_a_table_settings_pass_through_variables_are_known() -> None:
    settings = settings_of([Settings, _WithTable])
    environ = {"OUTBOX_CLIENT_PROPERTIES__SASL_MECHANISM": "PLAIN"}
    assert unknown_variables(settings, environ) == []


def test_a_table_comes_from_a_file_section_and_its_variables(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("OUTBOX_CONFIG_FILE", write(tmp_path / "outbox.toml", (
        'database_url = "postgresql+psycopg://u@db/app"\nkafka_bootstrap = "k:9093"\n'
        '[client_properties]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanism" = "PLAIN"\n')))
    clean_env.setenv("OUTBOX_CLIENT_PROPERTIES__SASL_MECHANISM", "SCRAM-SHA-512")
    assert _WithTable().client_properties == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
        "sasl_mechanism": "SCRAM-SHA-512"}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_secret_is_read_from_its_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("OUTBOX_KAFKA_BOOTSTRAP", "kafka:9092")
    clean_env.setenv("OUTBOX_DATABASE_URL_FILE", write(tmp_path / "db", DB_URL + "\n"))
    assert Settings().database_url == DB_URL
    clean_env.setenv("OUTBOX_DATABASE_URL", DB_URL)
    with pytest.raises(ConfigurationError, match="OUTBOX_DATABASE_URL and "
                       "OUTBOX_DATABASE_URL_FILE are both set"):
        Settings()


@pytest.mark.parametrize(("content", "error"), [
    (None, "OUTBOX_DATABASE_URL_FILE=.*: cannot read it"),
    ("\n", "OUTBOX_DATABASE_URL_FILE=.*: the file is empty"),
])
def test_an_unreadable_secret_file_is_an_error(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                               content: str | None, error: str) -> None:
    path = tmp_path / "db"
    if content is not None:
        path.write_text(content)
    clean_env.setenv("OUTBOX_DATABASE_URL_FILE", str(path))
    with pytest.raises(ConfigurationError, match=error):
        Settings()


CONFIG = """
database_url = "postgresql+psycopg://app:from-file@db.example.com/app"
kafka_bootstrap = "kafka-1.example.com:9093"
topic_partitions = 12
redis_prefix = "orders"

[wire_formats]
order = "debezium"
"""


def test_the_configuration_file_is_read_and_the_environment_overrides_it(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("OUTBOX_CONFIG_FILE", write(tmp_path / "outbox.toml", CONFIG))
    clean_env.setenv("OUTBOX_TOPIC_PARTITIONS", "6")
    clean_env.setenv("OUTBOX_ES_URL", "http://es:9200")
    clean_env.setenv("OUTBOX_REDIS_URL", "redis://r:6379/0")
    s = AppSettings()
    assert (s.kafka_bootstrap, s.topic_partitions, s.redis_prefix) == (
        "kafka-1.example.com:9093", 6, "orders")
    assert s.wire_formats == {"order": "debezium"}
    assert Settings().topic_partitions == 6  # a class without redis_prefix reads the file too


def test_an_unknown_key_in_the_configuration_file_names_the_closest(tmp_path: Path) -> None:
    settings = settings_of(installed_classes())
    data = load_config_file({"OUTBOX_CONFIG_FILE": write(
        tmp_path / "outbox.toml", 'topic_partitons = 3\nredis_prefix = "x"\n')})
    assert unknown_file_keys(settings, data) == [
        "OUTBOX_CONFIG_FILE: unknown key 'topic_partitons'; did you mean topic_partitions?"]


@pytest.mark.parametrize(("content", "error"), [
    (None, "cannot read it"), ("database_url = ", "not valid TOML")])
def test_a_bad_configuration_file_is_an_error(tmp_path: Path, content: str | None,
                                              error: str) -> None:
    path = tmp_path / "outbox.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=f"OUTBOX_CONFIG_FILE={path}: {error}"):
        load_config_file({"OUTBOX_CONFIG_FILE": str(path)})


def test_mask_hides_passwords_only() -> None:
    assert mask(DB_URL, True) == f"postgresql+psycopg://app:{MASK}@db.example.com:5432/app"
    assert mask("redis://r:6379/0", True) == "redis://r:6379/0"
    assert mask("key1:org1", True) == MASK
    assert mask("orders", False) == "orders"
    assert mask({"sasl.password": "p", "sasl.username": "u"}, False) == {
        "sasl.password": MASK, "sasl.username": "u"}


def test_origins_say_where_each_value_came_from(tmp_path: Path) -> None:
    settings = settings_of(installed_classes())
    environ = {"OUTBOX_KAFKA_BOOTSTRAP": "kafka:9093",
               "OUTBOX_API_KEYS_FILE": write(tmp_path / "keys", "k1:org1\n")}
    rows = {r["name"]: r for r in origins(settings, environ, {"database_url": DB_URL})}
    assert rows["kafka_bootstrap"]["origin"] == "environment"
    assert (rows["api_keys"]["origin"], rows["api_keys"]["value"]) == ("file-secret", MASK)
    assert (rows["database_url"]["origin"], rows["database_url"]["value"]) == (
        "file", mask(DB_URL, True))
    assert (rows["topic_prefix"]["origin"], rows["topic_prefix"]["value"]) == (
        "default", "outbox")
    assert rows["es_url"]["origin"] == "missing"


def test_outbox_config_json(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("OUTBOX_DATABASE_URL", DB_URL)
    clean_env.setenv("OUTBOX_CONFIG_FILE", write(tmp_path / "c.toml", "topic_partitions = 7\n"))
    assert main(["config", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["variable"]: r for r in report["settings"]}
    assert rows["OUTBOX_DATABASE_URL"]["value"] == mask(DB_URL, True)
    assert (rows["OUTBOX_TOPIC_PARTITIONS"]["origin"], rows["OUTBOX_TOPIC_PARTITIONS"]["value"]) \
        == ("file", 7)
    assert report["problems"] == []
    assert "s3cret" not in json.dumps(report)


def test_outbox_config_reports_a_secret_set_twice(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("OUTBOX_REDIS_URL", "redis://:pw@r:6379/0")
    clean_env.setenv("OUTBOX_REDIS_URL_FILE", write(tmp_path / "redis", "redis://r:6379/1"))
    assert main(["config"]) == 2
    assert ("outbox config: OUTBOX_REDIS_URL and OUTBOX_REDIS_URL_FILE are both set: keep one"
            in capsys.readouterr().err)


def test_outbox_config_reports_an_unknown_variable(clean_env: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("OUTBOX_REDIS_URLL", "redis://r:6379/0")
    assert main(["config"]) == 2
    out, err = capsys.readouterr()
    assert "OUTBOX_DATABASE_URL" in out and "missing" in out
    assert "outbox config: OUTBOX_REDIS_URLL: unknown setting; did you mean OUTBOX_REDIS_URL?" \
        in err


def test_the_kafka_section_of_the_file_and_a_password_file_configure_kafka(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("OUTBOX_CONFIG_FILE", write(tmp_path / "outbox.toml", (
        'database_url = "postgresql+psycopg://u@db/app"\n'
        'kafka_bootstrap = "kafka-1.example.com:9093"\n'
        'kafka_security_protocol = "SASL_SSL"\n'
        'kafka_sasl_mechanism = "SCRAM-SHA-512"\n'
        'kafka_sasl_username = "relay"\n'
        '[kafka_properties]\n"client.rack" = "use1-az1"\n"socket.keepalive.enable" = true\n')))
    clean_env.setenv("OUTBOX_KAFKA_SASL_PASSWORD_FILE", write(tmp_path / "pw", "k-secret\n"))
    s = Settings()
    assert s.kafka_security_config()["sasl.password"] == "k-secret"
    assert s.kafka_passthrough_config() == {"client.rack": "use1-az1",
                                            "socket.keepalive.enable": "true"}


def test_the_workers_need_no_view_store_and_the_views_do(clean_env: pytest.MonkeyPatch) -> None:
    from outbox_app.projector_specs import BUILTIN
    from outbox_app.settings import ProjectorSettings, WorkerSettings

    for name, value in REQUIRED.items():
        clean_env.setenv(name, value)
    clean_env.setenv("OUTBOX_S3_BUCKET", "blobs")
    # An OCR or embedding pod has no search server or Redis to name.
    assert WorkerSettings().database_url == DB_URL
    with pytest.raises(ValidationError) as caught:
        ProjectorSettings()
    assert {m.split(" (")[0] for m in validation_messages(caught.value, [ProjectorSettings])} \
        == {"missing setting OUTBOX_ES_URL", "missing setting OUTBOX_REDIS_URL"}
    assert {s.name: s.settings for s in BUILTIN} == {
        "ocr": WorkerSettings, "embed": WorkerSettings, "search": ProjectorSettings,
        "cache": ProjectorSettings}
