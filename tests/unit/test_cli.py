"""`onnxmesh` CLI: argument parsing, image files, output helpers, and a friendly error when nothing listens.

No server is started here: the "mesh not running" cases point the CLI at a port nobody listens on.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from demo import client as demo_client
from meshctl import cli, predict, targets
from services.common.errors import DeadlineExceeded, NotFound, Unavailable, from_status
from tests.support import free_port

REFUSED = "unavailable: connections to all backends failing; last error: Connection refused"


@pytest.fixture
def dead_target() -> str:
    """A 127.0.0.1 port that was free a moment ago: connections to it are refused."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def image() -> np.ndarray:
    return np.arange(64, dtype=np.uint8).reshape(8, 8) % 17


# -- the mesh is not running ---------------------------------------------------------------------------


def test_predict_without_a_mesh_exits_1_with_a_hint(
    dead_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["predict", "--target", dead_target, "--connect-timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip() == (
        f"onnxmesh: nothing listens on {dead_target} (connection refused): is the mesh running? "
        "start it with 'make run' (or pass --target/--base-port)"
    )
    assert "Traceback" not in out + err


def test_health_without_a_mesh_reports_each_target_and_exits_1(
    dead_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["health", "--target", dead_target, "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.strip() == f"{dead_target}  UNREACHABLE (UNAVAILABLE)"
    assert "is the mesh running?" in err


def test_models_without_a_mesh_exits_1(dead_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--target", dead_target, "--timeout", "2"]) == 1
    assert f"nothing listens on {dead_target} (connection refused)" in capsys.readouterr().out


def test_predict_with_a_bad_image_file_fails_before_calling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3")
    assert cli.main(["predict", "--image", str(bad), "--target", "127.0.0.1:1"]) == 1
    assert "expected 64 pixel values" in capsys.readouterr().err


# -- argument parsing ----------------------------------------------------------------------------------


def test_predict_defaults() -> None:
    args = cli.build_parser().parse_args(["predict"])
    assert (args.name, args.index, args.image, args.count, args.version, args.target) == (
        "digits-parallel",
        0,
        None,
        1,
        "",
        None,
    )


def test_predict_options() -> None:
    args = cli.build_parser().parse_args(
        ["predict", "digits-serial", "--index", "7", "--count", "20", "--target", "h:1", "--version", "2"]
    )
    assert (args.name, args.index, args.count, args.target, args.version) == (
        "digits-serial",
        7,
        20,
        "h:1",
        "2",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--index", "1", "--image", "x.npy"],  # one source only
        ["predict", "--count", "0"],
        ["predict", "--index", "-1"],
        [],  # a command is required
        ["frobnicate"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2


def test_count_with_an_image_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "--image", "x.npy", "--count", "3"]) == 1
    assert "--count sends held-out digits" in capsys.readouterr().err


def test_health_and_models_accept_several_targets() -> None:
    args = cli.build_parser().parse_args(["health", "--target", "a:1", "--target", "b:2"])
    assert args.target == ["a:1", "b:2"]
    args = cli.build_parser().parse_args(["models", "--model", "digits-mlp", "--model", "digits-head"])
    assert args.model == ["digits-mlp", "digits-head"] and args.target is None


def test_unknown_arguments_of_a_command_are_usage_errors() -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["health", "--frobnicate"])
    assert caught.value.code == 2


def test_rollout_hands_its_arguments_to_meshctl_rollout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["rollout", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: onnxmesh rollout")
    assert all(command in out for command in ("status", "set-image", "canary", "promote", "abort"))
    with pytest.raises(SystemExit) as caught:
        cli.main(["rollout", "canary", "digits-serial"])  # no step, no --weights
    assert caught.value.code == 2


def test_rollout_without_the_kubernetes_client_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # `import kubernetes` now fails: no k8s extra

    assert cli.main(["rollout", "status"]) == 2
    err = capsys.readouterr().err
    assert "the rollout commands need the Kubernetes client" in err
    assert "pip install 'onnxmesh[k8s]'" in err
    assert "Traceback" not in err


# -- targets -------------------------------------------------------------------------------------------


def test_default_target_is_the_local_node_serving_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(targets.TARGET_ENV, raising=False)
    assert targets.default_target("digits-parallel") == "127.0.0.1:8001"
    assert targets.default_target("digits-preprocess") == "127.0.0.1:8011"
    assert targets.default_target("digits-mlp") == "127.0.0.1:8021"
    assert targets.default_target("digits-head") == "127.0.0.1:8031"
    assert targets.default_target("my-own-graph") == "127.0.0.1:8001"
    monkeypatch.setenv(targets.TARGET_ENV, "10.0.0.5:8001")
    assert targets.default_target("digits-mlp") == "10.0.0.5:8001"


def test_explain_adds_the_hint_only_when_nothing_answered() -> None:
    hint = "is the mesh running? start it with 'make run'"
    assert hint in targets.explain("h:1", Unavailable(f"h:1 {REFUSED}"))
    assert hint in targets.explain("h:1", DeadlineExceeded("h:1: deadline exceeded"), connecting=True)
    # A server that answered (draining, loading, slow) is not "the mesh is not running".
    assert targets.explain("h:1", Unavailable("server is shutting down")) == (
        "h:1: UNAVAILABLE: server is shutting down"
    )
    assert hint not in targets.explain("h:1", DeadlineExceeded("h:1: deadline exceeded"))
    assert targets.explain("h:1", NotFound("no model 'x'")) == "h:1: NOT_FOUND: no model 'x'"


# -- image files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (64,)])
def test_load_image_from_npy(tmp_path: Path, image: np.ndarray, shape: tuple[int, ...]) -> None:
    path = tmp_path / "digit.npy"
    np.save(path, image.reshape(shape).astype(np.int64))
    loaded = demo_client.load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 8)
    np.testing.assert_array_equal(loaded, image)


@pytest.mark.parametrize("separator", [",", " ", "\t"])
def test_load_image_from_text(tmp_path: Path, image: np.ndarray, separator: str) -> None:
    path = tmp_path / "digit.csv"
    path.write_text("\n".join(separator.join(str(v) for v in row) for row in image) + "\n")
    np.testing.assert_array_equal(demo_client.load_image(path), image)


def test_load_image_accepts_one_line_and_whole_floats(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "digit.txt"
    path.write_text(" ".join(f"{v}.0" for v in image.reshape(-1)))
    np.testing.assert_array_equal(demo_client.load_image(path), image)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 " * 63, "expected 64 pixel values (an 8x8 image), found 63"),
        ("1 " * 63 + "17", "pixel values must be 0..16, found 1..17"),
        ("1 " * 63 + "-1", "pixel values must be 0..16"),
        ("1 " * 63 + "0.5", "expected integer pixel values 0..16"),
        ("1 " * 63 + "x", "cannot read an image"),
    ],
)
def test_load_image_rejects_bad_text(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "digit.txt"
    path.write_text(text)
    with pytest.raises(targets.CliError, match=re.escape(message)):
        demo_client.load_image(path)


def test_load_image_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(targets.CliError, match="cannot read an image"):
        demo_client.load_image(tmp_path / "missing.npy")


def test_held_out_digits_are_selected_in_order_and_wrap(tmp_path: Path) -> None:
    data = tmp_path / "holdout.npz"
    images = np.arange(3 * 64, dtype=np.uint8).reshape(3, 8, 8) % 17
    np.savez(data, images=images, labels=np.array([4, 5, 6], dtype=np.int64))
    args = cli.build_parser().parse_args(["predict", "--index", "2", "--count", "2", "--data", str(data)])
    digits = demo_client.select_digits(args)
    assert digits.labels is not None and digits.labels.tolist() == [6, 4]
    np.testing.assert_array_equal(digits.images, images[[2, 0]])
    assert digits.description == ["held-out #2", "held-out #0"]


# -- output helpers ------------------------------------------------------------------------------------


def test_format_probabilities_marks_the_top_class() -> None:
    probabilities = np.array([0.01, 0.0, 0.0, 0.95, 0.04, 0, 0, 0, 0, 0], dtype=np.float32)
    text = predict.format_probabilities(probabilities)
    assert text.startswith("0:0.01 1:0.00 2:0.00 3:0.95* 4:0.04")
    assert text.count("*") == 1


def test_step_and_version_parameters_are_read_per_name() -> None:
    parameters: dict[str, object] = {
        "step.mlp": "ok",
        "step.logreg": "timeout: 50 ms budget spent",
        "version.mlp": "1",
        "other": 3,
    }
    steps = predict.response_details(parameters, "step.")
    assert steps == {"logreg": "timeout: 50 ms budget spent", "mlp": "ok"}
    assert [predict.step_outcome(v) for v in steps.values()] == ["timeout", "ok"]
    assert predict.response_details(parameters, "version.") == {"mlp": "1"}


# -- one layout for every address, and messages that say what is wrong --------------------------------


def test_chained_inputs_follow_the_targets_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXMESH_SERVICE_PREPROCESS_ADDRESS", raising=False)
    layout = targets.layout_near("127.0.0.1:10021", "digits-mlp", None)
    assert targets.service_address("preprocess", layout) == "127.0.0.1:10011"
    assert targets.layout_near("10.1.2.3:9031", "digits-head", None)["model_a"] == "10.1.2.3:9021"
    assert targets.layout_near("127.0.0.1:10021", "digits-mlp", 12000)["preprocess"] == "127.0.0.1:12011"
    assert targets.layout_near("somewhere:443", "my-graph", None)["preprocess"] == "127.0.0.1:8011"
    monkeypatch.setenv("ONNXMESH_SERVICE_PREPROCESS_ADDRESS", "10.0.0.9:7011")
    assert targets.service_address("preprocess", layout) == "10.0.0.9:7011"


def test_base_port_moves_every_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXMESH_TARGET", raising=False)
    assert targets.default_target("digits-mlp", 10000) == "127.0.0.1:10021"
    args = cli.build_parser().parse_args(["health", "--base-port", "10000"])
    assert sorted(cli._targets(args).values()) == [
        "127.0.0.1:10001",
        "127.0.0.1:10011",
        "127.0.0.1:10021",
        "127.0.0.1:10031",
    ]


def test_an_index_outside_the_held_out_set_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "--index", "99999", "--target", "127.0.0.1:1"]) == 1
    assert (
        "--index 99999 is out of range: the held-out set has 360 images (0..359)" in capsys.readouterr().err
    )


def test_a_url_target_is_refused_with_the_address_to_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["health", "--target", "http://127.0.0.1:8001"]) == 1
    err = capsys.readouterr().err
    assert (
        "'http://127.0.0.1:8001' is a URL; give the node's gRPC address as HOST:PORT, e.g. 127.0.0.1:8001"
        in err
    )


# What gRPC's last error says in each case (grpcio 1.7x), as the client reports it.
_LAST_ERROR = "h:1 unavailable: connections to all backends failing; last error: "


@pytest.mark.parametrize(
    ("last_error", "says"),
    [
        (
            "UNKNOWN: ipv4:h:1: Failed to connect to remote host: Connection refused",
            "nothing listens on h:1 (connection refused): is the mesh running?",
        ),
        (
            "INTERNAL: ipv4:h:1: Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got "
            "frame type 80) (Trying to connect an http1.x server (HTTP status 400))",
            "h:1 answers HTTP/1.x, not gRPC: that is a REST port",
        ),
        (
            "UNAVAILABLE: ipv4:h:1: Socket closed",
            "h:1 closed the connection during set-up: it likely serves TLS only (make run --tls); export "
            "ONNXMESH_TLS_CERT",
        ),
        (
            "UNKNOWN: ipv4:h:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:"
            "SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
            "h:1 does not speak TLS (handshake refused): the mesh runs without --tls; unset ONNXMESH_TLS_CERT",
        ),
        (
            "UNKNOWN: ipv4:h:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
            "CERTIFICATE_VERIFY_FAILED",
            "the TLS handshake with h:1 failed: check that ONNXMESH_TLS_CA is the CA",
        ),
    ],
)
def test_each_connection_failure_gets_its_cause_and_fix(last_error: str, says: str) -> None:
    line = targets.explain("h:1", Unavailable(_LAST_ERROR + last_error), connecting=True)
    assert line.startswith(says) and "\n" not in line


def test_a_missing_token_says_which_variable_to_set() -> None:
    line = targets.explain("h:1", from_status("UNAUTHENTICATED", "missing or invalid bearer token"))
    assert line.startswith(
        "h:1: UNAUTHENTICATED: missing or invalid bearer token; export ONNXMESH_TOKEN_FILE="
    )


def test_messages_are_never_empty_and_dns_failures_say_so() -> None:
    assert targets.explain("x:1", NotFound("")) == "x:1: NOT_FOUND: the server gave no detail for NOT_FOUND"
    dns = Unavailable("DNS resolution failed for nowhere.invalid:8001: C-ares status is not ARES_SUCCESS")
    assert targets.explain("nowhere.invalid:8001", dns, connecting=True) == (
        "cannot resolve 'nowhere.invalid' (UNAVAILABLE): check the host name in nowhere.invalid:8001"
    )


def test_batch_checks_its_dataset_before_connecting(
    dead_target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.npz"
    db = tmp_path / "jobs.sqlite"
    assert cli.main(["batch", "digits-parallel", str(missing), "--target", dead_target, "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"onnxmesh: {missing}: no such file"
    assert not db.exists()  # nothing was opened either
