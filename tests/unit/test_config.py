"""Unit tests for node settings (node/config.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.uid import (
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from node import config
from node.config import ENV_CONFIG, ConfigError, Settings, load

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture(autouse=True)
def _no_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)


def _write(folder: Path, text: str, name: str = "pacsnode.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ------------------------------------------------------------------------------


def test_load_none_gives_the_documented_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(None)
    data_dir = tmp_path.absolute() / "pacsnode-data"
    assert settings.source is None
    assert settings.node.data_dir == "./pacsnode-data"
    assert settings.data_dir == data_dir
    assert settings.database_url == f"sqlite:///{data_dir / 'pacsnode.db'}"
    assert settings.storage_dir == data_dir / "storage"
    assert settings.bootstrap_partition.ae_title == "PACSNODE"
    assert settings.bootstrap_partition.port == 11112
    assert settings.bootstrap_partition.folder == "PACSNODE"
    assert settings.dicom.max_pdu_size == 1_048_576
    assert settings.dicom.enforce_default_transfer_syntax is False
    # The fast configuration is the default: one association process per CPU core.
    assert settings.dicom.processes() == len(os.sched_getaffinity(0))


def test_load_without_argument_is_load_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load() == load(None)


def test_load_none_does_not_create_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    load(None)
    assert not (tmp_path / "pacsnode-data").exists()


def test_default_transfer_syntaxes_put_uncompressed_first_and_know_all() -> None:
    accepted = load(None).accepted_transfer_syntaxes
    assert accepted[:4] == [
        EXPLICIT,
        IMPLICIT,
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    ]
    assert set(accepted) == {str(uid) for uid in AllTransferSyntaxes}
    assert len(accepted) == len(set(accepted))


def test_default_settings_do_not_share_mutable_lists() -> None:
    a, b = Settings(), Settings()
    a.dicom.transfer_syntaxes.clear()
    assert b.dicom.transfer_syntaxes


def test_accepted_transfer_syntaxes_is_a_copy() -> None:
    settings = load(None)
    settings.accepted_transfer_syntaxes.clear()
    assert settings.accepted_transfer_syntaxes


# --- files ---------------------------------------------------------------------------------


def test_empty_file_gives_defaults_with_the_file_as_source(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    settings = load(path)
    assert settings.source == path.absolute()
    assert settings.dicom.max_pdu_size == 1_048_576
    assert settings.bootstrap_partition.port == 11112
    # the default ./pacsnode-data is relative to the file as well
    assert settings.data_dir == tmp_path.absolute() / "pacsnode-data"


def test_relative_data_dir_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    path = _write(conf, '[node]\ndata_dir = "data"\n')
    monkeypatch.chdir(elsewhere)
    settings = load(path)
    assert settings.data_dir == conf.absolute() / "data"
    assert settings.storage_dir == conf.absolute() / "data" / "storage"
    assert settings.database_url == f"sqlite:///{conf.absolute() / 'data' / 'pacsnode.db'}"


def test_relative_path_to_the_file_itself_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    _write(tmp_path / "etc", '[node]\ndata_dir = "data"\n')
    monkeypatch.chdir(tmp_path)
    settings = load("etc/pacsnode.toml")
    assert settings.source == tmp_path.absolute() / "etc" / "pacsnode.toml"
    monkeypatch.chdir(tmp_path / "etc")  # a later cwd change must not move the data
    assert settings.data_dir == tmp_path.absolute() / "etc" / "data"


def test_absolute_data_dir_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "abs-data"
    path = _write(tmp_path, f'[node]\ndata_dir = "{data}"\n')
    assert load(path).data_dir == data


def test_storage_dir_and_database_url_override(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[node]\nstorage_dir = "images"\n'
        'database_url = "postgresql+psycopg://u@localhost/pacs"\n',
    )
    settings = load(path)
    assert settings.storage_dir == tmp_path.absolute() / "images"
    assert settings.database_url == "postgresql+psycopg://u@localhost/pacs"


def test_values_from_every_section_are_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "[node]\n"
        'name = "site-a"\n'
        "partition_poll_seconds = 5\n"  # an int where a float is expected is fine
        "[dicom]\n"
        "max_pdu_size = 16384\n"
        "acse_timeout = 2.5\n"
        "[bootstrap_partition]\n"
        'ae_title = "SITEA"\n'
        "port = 4242\n",
    )
    settings = load(path)
    assert settings.node.name == "site-a"
    assert settings.node.partition_poll_seconds == 5.0
    assert isinstance(settings.node.partition_poll_seconds, float)
    assert settings.dicom.max_pdu_size == 16384
    assert settings.dicom.acse_timeout == 2.5
    assert settings.bootstrap_partition.ae_title == "SITEA"
    assert settings.bootstrap_partition.port == 4242
    assert settings.bootstrap_partition.folder == "PACSNODE"  # untouched keys keep defaults


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load(missing)
    assert str(missing) in str(info.value)


def test_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[node\nname = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- refusals ------------------------------------------------------------------------------


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "[nodes]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[nodes\]"):
        load(path)


def test_top_level_key_is_an_unknown_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "source = '/etc'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[source\]"):
        load(path)


def test_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "node = 3\n")
    with pytest.raises(ConfigError, match=r"\[node\] must be a table"):
        load(path)


@pytest.mark.parametrize(
    ("section", "key"),
    [("node", "datadir"), ("dicom", "max_pdu"), ("bootstrap_partition", "ae")],
)
def test_unknown_key_is_named(tmp_path: Path, section: str, key: str) -> None:
    path = _write(tmp_path, f"[{section}]\n{key} = 1\n")
    with pytest.raises(ConfigError, match=rf"unknown setting {section}\.{key}\b"):
        load(path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[dicom]\nmax_pdu_size = "big"\n', "dicom.max_pdu_size must be int, got str"),
        ("[dicom]\nmax_pdu_size = 16384.0\n", "dicom.max_pdu_size must be int, got float"),
        ("[dicom]\nmax_pdu_size = true\n", "dicom.max_pdu_size must be int, got bool"),
        ("[bootstrap_partition]\nport = true\n", "bootstrap_partition.port must be int"),
        ("[node]\ndata_dir = 3\n", "node.data_dir must be str, got int"),
        ("[dicom]\nacse_timeout = true\n", "dicom.acse_timeout must be float, got bool"),
        ("[dicom]\nacse_timeout = '30'\n", "dicom.acse_timeout must be float, got str"),
        (
            '[dicom]\nenforce_default_transfer_syntax = "yes"\n',
            "dicom.enforce_default_transfer_syntax must be bool, got str",
        ),
        (
            '[dicom]\ntransfer_syntaxes = "1.2.840.10008.1.2"\n',
            "dicom.transfer_syntaxes must be list, got str",
        ),
    ],
)
def test_wrong_type_is_refused(tmp_path: Path, toml: str, message: str) -> None:
    path = _write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value)


@pytest.mark.parametrize("size", [0, -1, 4095])
def test_too_small_max_pdu_size_is_refused(tmp_path: Path, size: int) -> None:
    path = _write(tmp_path, f"[dicom]\nmax_pdu_size = {size}\n")
    with pytest.raises(ConfigError, match="max_pdu_size"):
        load(path)


def test_smallest_max_pdu_size_is_accepted(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "[dicom]\nmax_pdu_size = 4096\n")).dicom.max_pdu_size == 4096


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[dicom]\nacse_timeout = 0\n", "dicom.acse_timeout"),
        ("[dicom]\ndimse_timeout = -1.0\n", "dicom.dimse_timeout"),
        ("[dicom]\nnetwork_timeout = 0.0\n", "dicom.network_timeout"),
        ("[dicom]\nconnection_timeout = -5\n", "dicom.connection_timeout"),
        ("[dicom]\nmaximum_associations = 0\n", "dicom.maximum_associations"),
        ("[dicom]\ntransfer_syntaxes = []\n", "dicom.transfer_syntaxes"),
        ("[bootstrap_partition]\nport = 0\n", "bootstrap_partition.port"),
        ("[bootstrap_partition]\nport = 65536\n", "bootstrap_partition.port"),
        ("[node]\npartition_poll_seconds = 0\n", "node.partition_poll_seconds"),
        ("[node]\ndatabase_timeout = 0\n", "node.database_timeout"),
        ("[node]\ndatabase_connect_timeout = -1\n", "node.database_connect_timeout"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(_write(tmp_path, toml))


# --- transfer syntaxes ---------------------------------------------------------------------


def test_transfer_syntax_keyword_is_resolved_to_the_uid(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[dicom]\ntransfer_syntaxes = ["ExplicitVRLittleEndian", "1.2.840.10008.1.2"]\n',
    )
    settings = load(path)
    assert settings.dicom.transfer_syntaxes == [str(ExplicitVRLittleEndian), IMPLICIT]
    assert settings.accepted_transfer_syntaxes == [EXPLICIT, IMPLICIT]


def test_transfer_syntax_name_is_resolved_to_the_uid(tmp_path: Path) -> None:
    name = JPEG2000Lossless.name
    assert name == "JPEG 2000 Image Compression (Lossless Only)"
    path = _write(tmp_path, f'[dicom]\ntransfer_syntaxes = ["{name}"]\n')
    assert load(path).accepted_transfer_syntaxes == [str(JPEG2000Lossless)]


def test_resolve_transfer_syntax() -> None:
    assert config.resolve_transfer_syntax("ImplicitVRLittleEndian") == IMPLICIT
    assert config.resolve_transfer_syntax(IMPLICIT) == IMPLICIT
    assert config.resolve_transfer_syntax("1.2.3.4") == "1.2.3.4"  # left to validate()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("value", ["1.2.3.4", "ExplicitVRLittleEndain", ""])
def test_unknown_transfer_syntax_is_refused(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path, f'[dicom]\ntransfer_syntaxes = ["{EXPLICIT}", "{value}"]\n')
    with pytest.raises(ConfigError, match="is not a known transfer syntax") as info:
        load(path)
    assert repr(value) in str(info.value)


def test_enforce_default_transfer_syntax_accepts_only_implicit_vr_little_endian(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "[dicom]\n"
        "enforce_default_transfer_syntax = true\n"
        'transfer_syntaxes = ["ExplicitVRLittleEndian", "JPEG2000Lossless"]\n',
    )
    settings = load(path)
    assert settings.accepted_transfer_syntaxes == [str(ImplicitVRLittleEndian)]
    assert settings.accepted_transfer_syntaxes == [IMPLICIT]


# --- environment ---------------------------------------------------------------------------


def test_env_var_names_the_file_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "[bootstrap_partition]\nport = 2104\n")
    monkeypatch.setenv(ENV_CONFIG, str(path))
    settings = load(None)
    assert settings.source == path.absolute()
    assert settings.bootstrap_partition.port == 2104


def test_explicit_path_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _write(tmp_path, "[bootstrap_partition]\nport = 2104\n", name="env.toml")
    arg_file = _write(tmp_path, "[bootstrap_partition]\nport = 3104\n", name="arg.toml")
    monkeypatch.setenv(ENV_CONFIG, str(env_file))
    assert load(arg_file).bootstrap_partition.port == 3104


def test_env_var_pointing_nowhere_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CONFIG, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load(None)


def test_empty_env_var_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_CONFIG, "")
    settings = load(None)
    assert settings.source is None
    assert settings.bootstrap_partition.port == 11112


def test_hierarchy_defaults_listen_on_loopback_with_the_node_name_as_id(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, '[node]\nname = "site-a"\n'))
    assert settings.node_id == "site-a"
    assert settings.hierarchy.control_listen == "127.0.0.1:50051"
    assert settings.hierarchy.parent == ""


@pytest.mark.parametrize(("text", "message"), [
    ('[hierarchy]\ncontrol_listen = "0.0.0.0:50051"\n', "not a loopback address"),
    ('[hierarchy]\ncontrol_listen = "50051"\n', "hierarchy.control_listen must be host:port"),
    ('[hierarchy]\nparent = "central"\n', "hierarchy.parent must be host:port"),
    ('[hierarchy]\nnode_id = "a b"\n', "hierarchy.node_id 'a b'"),
    ('[hierarchy]\ntls_cert = "x.crt"\n', "must be given together"),
    ('[hierarchy]\ntls_cert = "x.crt"\ntls_key = "x.key"\ntls_ca = "ca.crt"\n', "does not exist"),
    ('[hierarchy]\nheartbeat_seconds = 0\n', "hierarchy.heartbeat_seconds must be positive"),
])
def test_invalid_hierarchy_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(_write(tmp_path, text))


def test_remote_listening_without_tls_needs_an_explicit_yes(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, '[hierarchy]\ncontrol_listen = "0.0.0.0:50051"\n'
                                     "allow_insecure_remote = true\n"))
    assert settings.hierarchy.allow_insecure_remote
    for name in ("ca.crt", "node.crt", "node.key"):
        (tmp_path / name).write_text("pem")
    tls = load(_write(tmp_path, '[hierarchy]\ncontrol_listen = "0.0.0.0:50051"\n'
                                'tls_ca = "ca.crt"\ntls_cert = "node.crt"\ntls_key = "node.key"\n'))
    assert tls.tls_file("tls_ca") == tmp_path / "ca.crt"  # relative to the settings file


def test_storage_lifecycle_settings_are_read(tmp_path: Path) -> None:
    settings = load(_write(tmp_path, """
[storage]
low_watermark = 70
high_watermark = 85.5
critical_watermark = 97
purge_order = "accessed"
protected_studies = 100
archive_device_types = ["parent", "DICOM"]
[notify]
email_to = "pacs-admin@example.org"
smtp_host = "127.0.0.1"
"""))
    assert (settings.storage.low_watermark, settings.storage.high_watermark,
            settings.storage.critical_watermark) == (70.0, 85.5, 97.0)
    assert settings.storage.purge_order == "accessed"
    assert settings.storage.archive_device_types == ["PARENT", "DICOM"]
    assert settings.notify.email_to == "pacs-admin@example.org"


@pytest.mark.parametrize(("text", "message"), [
    ("[storage]\nlow_watermark = 90\nhigh_watermark = 80", "low_watermark <= high_watermark"),
    ("[storage]\ncritical_watermark = 85", "high_watermark <= critical_watermark"),
    ("[storage]\nhigh_watermark = 120", "storage.high_watermark must be a percentage"),
    ("[storage]\npurge_order = \"newest\"", "storage.purge_order"),
    ("[storage]\npurge_batch_size = 0", "storage.purge_batch_size"),
    ("[storage]\narchive_device_types = [\"TAPE\"]", "storage.archive_device_types"),
    ("[storage]\ncpu_idle_threshold = 101", "storage.cpu_idle_threshold"),
    ("[notify]\nemail_to = \"a@b\"", "notify.email_to needs notify.smtp_host"),
])
def test_bad_storage_settings_are_refused_naming_the_key(tmp_path: Path, text: str,
                                                         message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(_write(tmp_path, text))


def test_association_processes_zero_is_one_per_core_and_out_of_range_is_named(
        tmp_path: Path) -> None:
    auto = load(_write(tmp_path, "[dicom]\nassociation_processes = 0\n"))
    assert auto.dicom.processes() == len(os.sched_getaffinity(0))
    assert load(_write(tmp_path, "[dicom]\nassociation_processes = 3\n")).dicom.processes() == 3
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match=r"dicom\.association_processes must be 0"):
            load(_write(tmp_path, f"[dicom]\nassociation_processes = {bad}\n"))


# --- log level -------------------------------------------------------------------------------


def test_a_log_level_logging_does_not_know_is_refused_with_the_known_ones(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(_write(tmp_path, '[node]\nlog_level = "VERBOSE"\n'))
    assert str(refused.value) == ("node.log_level 'VERBOSE' is not a log level: use one of DEBUG,"
                                  " INFO, WARNING, ERROR, CRITICAL")


@pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), (" Warning ", "WARNING"),
                                              ("WARN", "WARN"), ("critical", "CRITICAL")])
def test_log_levels_are_read_in_any_case(tmp_path: Path, value: str, level: str) -> None:
    assert load(_write(tmp_path, f'[node]\nlog_level = "{value}"\n')).node.log_level == level
