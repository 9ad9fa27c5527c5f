"""Token files, the constant-time match, client security from the environment, and the TLS
cost summary (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.probes.tls import HOPS, report
from services.common.grpc.security import (
    SecurityError,
    environ_security,
    read_tokens,
    token_matches,
)


def test_token_files_skip_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# clients of team a\nalpha\n\n  beta  \n")
    assert read_tokens(path) == (b"alpha", b"beta")
    path.write_text("# none\n\n")
    with pytest.raises(SecurityError, match="holds no token"):
        read_tokens(path)
    with pytest.raises(SecurityError, match="cannot read the token file"):
        read_tokens(tmp_path / "absent")


def test_every_accepted_token_is_compared() -> None:
    assert token_matches(b"beta", (b"alpha", b"beta"))
    assert not token_matches(b"bet", (b"alpha", b"beta"))
    assert not token_matches(b"", (b"alpha",))


def test_client_security_from_the_environment_never_shows_the_token(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("s3cret-token\n")
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("PEM")
    env = {
        "ONNXMESH_TLS_CERT": str(tmp_path / "c.pem"),
        "ONNXMESH_TLS_KEY": str(tmp_path / "k.pem"),
        "ONNXMESH_TLS_CA": str(tmp_path / "ca.pem"),
        "ONNXMESH_TOKEN_FILE": str(tmp_path / "tokens"),
    }
    security = environ_security(env)
    assert security.tls is not None and security.tls.ca == tmp_path / "ca.pem"
    assert security.metadata == (("authorization", "Bearer s3cret-token"),)
    assert "s3cret" not in repr(security)
    assert environ_security({}).tls is None and environ_security({}).metadata == ()
    with pytest.raises(SecurityError, match="go together"):
        environ_security({"ONNXMESH_TLS_CERT": str(tmp_path / "c.pem")})
    # The CA alone: TLS that verifies the server, no client certificate (orchestrator callers).
    trusting = environ_security({"ONNXMESH_TLS_CA": str(tmp_path / "ca.pem")})
    assert trusting.tls is None and trusting.ca == tmp_path / "ca.pem"


def test_the_tls_cost_is_the_median_difference_spread_over_the_hops() -> None:
    summary = report(
        {
            "plain": {"p50_c1": [2.0, 2.2, 9.0], "rps_c32": [400.0, 500.0, 450.0]},
            "mtls": {"p50_c1": [2.4, 2.6, 2.5], "rps_c32": [360.0, 400.0, 380.0]},
        }
    )
    assert summary["plain_p50_c1_ms"] == 2.2 and summary["mtls_p50_c1_ms"] == 2.5
    assert summary["per_hop_ms"] == pytest.approx(0.3 / HOPS)
    assert summary["rps_c32_ratio"] == pytest.approx(380.0 / 450.0)


def test_client_paths_are_made_absolute_or_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "tokens").write_text("t0k3n\n")
    monkeypatch.chdir(tmp_path)
    security = environ_security({"ONNXMESH_TLS_CA": "certs/tokens", "ONNXMESH_TOKEN_FILE": "certs/tokens"})
    assert security.ca == tmp_path / "certs" / "tokens"  # absolute: the same file from anywhere
    monkeypatch.chdir(tmp_path / "certs")
    with pytest.raises(SecurityError) as refused:
        environ_security({"ONNXMESH_TOKEN_FILE": "certs/tokens"})
    assert str(refused.value) == (
        f"ONNXMESH_TOKEN_FILE=certs/tokens: no such file (relative to {tmp_path / 'certs'}); "
        "give the file's absolute path"
    )
