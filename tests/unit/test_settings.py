"""Settings: each declared once, as a field; flags, environment names and the settings object follow."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from services.common.settings import (
    SETTINGS_FIELDS,
    ServerSettings,
    add_option,
    env_name,
    parse_server_settings,
    server_parser,
    settings_from_args,
)


def parser(**environ: str) -> argparse.ArgumentParser:
    return server_parser("svc", port=8021, model_dir=Path("/models"), description="d", environ=environ)


def test_every_field_but_service_is_a_flag_with_an_env_name() -> None:
    assert [f.name for f in SETTINGS_FIELDS] == [f.name for f in fields(ServerSettings)][1:]
    text = parser().format_help()
    for f in SETTINGS_FIELDS:
        assert f"--{f.name.replace('_', '-')} " in text and env_name(f.name) in text
    assert env_name("max-message-mb") == env_name("max_message_mb") == "ONNXMESH_MAX_MESSAGE_MB"


def test_defaults_are_the_fields_with_the_node_s_own_port_and_model_dir() -> None:
    settings = settings_from_args("svc", parser().parse_args([]))
    expected = ServerSettings("svc", port=8021, model_dir=Path("/models"))
    assert settings == expected
    assert settings.grace == 10.0 and settings.metrics_port is None and settings.log_level == "INFO"


def test_flag_beats_environment_beats_default() -> None:
    environ = {"ONNXMESH_GRACE": "3.5", "ONNXMESH_PORT": "9000", "ONNXMESH_LOG_LEVEL": "debug"}
    from_env = settings_from_args("svc", parser(**environ).parse_args([]))
    assert (from_env.grace, from_env.port, from_env.log_level) == (3.5, 9000, "DEBUG")
    from_flag = settings_from_args(
        "svc", parser(**environ).parse_args(["--port", "7", "--log-level", "warning"])
    )
    assert (from_flag.grace, from_flag.port, from_flag.log_level) == (3.5, 7, "WARNING")


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--metrics-port", "9100"], "metrics_port", 9100),
        (["--metrics-port", "off"], "metrics_port", None),
        (["--max-concurrent-rpcs", "none"], "max_concurrent_rpcs", None),
        (["--reuse-port", "yes"], "reuse_port", True),
        (["--reuse-port", "0"], "reuse_port", False),
        (["--model-dir", "/elsewhere"], "model_dir", Path("/elsewhere")),
        (["--max-connection-age", "1.5"], "max_connection_age", 1.5),
    ],
)
def test_each_field_parses_its_own_text(argv: list[str], field: str, value: object) -> None:
    assert getattr(settings_from_args("svc", parser().parse_args(argv)), field) == value


def test_help_names_the_env_variable_and_the_default() -> None:
    text = " ".join(parser().format_help().split())
    assert "gRPC port; 0 picks a free port and prints it (env ONNXMESH_PORT; default: 8021)" in text
    assert "(env ONNXMESH_DRAIN_DELAY; default: 0.5)" in text


def test_nodes_add_options_that_follow_the_same_rules() -> None:
    p = parser()
    add_option(
        p,
        "reload-interval",
        float,
        2.0,
        "seconds between checks",
        environ={"ONNXMESH_RELOAD_INTERVAL": "0.25"},
    )
    add_option(p, "graphs", Path, Path("g.yaml"), "graph spec", environ={})
    args = p.parse_args(["--graphs", "other.yaml"])
    assert (args.reload_interval, args.graphs) == (0.25, Path("other.yaml"))
    assert "(env ONNXMESH_RELOAD_INTERVAL; default: 2.0)" in " ".join(p.format_help().split())
    assert settings_from_args("svc", args).port == 8021  # extra flags are not settings


def test_parse_server_settings_reads_argv() -> None:
    settings = parse_server_settings("svc", ["--port", "1"], port=8021, model_dir=None, description="d")
    assert (settings.service, settings.port, settings.model_dir) == ("svc", 1, None)
