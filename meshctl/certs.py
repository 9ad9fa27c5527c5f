"""A local certificate authority and node certificates for `make run ARGS=--tls` and the tests.

`python -m meshctl.certs DIR` (`make certs`) writes, with the system's `openssl`:

    DIR/ca.pem, ca-key.pem        the CA (its key only signs the certificates below)
    DIR/node.pem, node-key.pem    one certificate every local node serves and presents as a
                                  client (mTLS), for localhost, 127.0.0.1 and the services' names
    DIR/tokens                    one random bearer token the orchestrator accepts

Private keys are written 0600 and never committed (`certs/` is in .gitignore). In Kubernetes
the certificates come from Secrets or cert-manager instead (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshctl.launcher import demo_mesh
from meshctl.mesh import Mesh, kubernetes_name

#: The names every local node certificate covers, beside its mesh's Kubernetes Service names.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def node_names(mesh: Mesh | None = None) -> tuple[str, ...]:
    """Loopback and the Kubernetes Service name of every node of `mesh` (default: the demo's)."""
    return (*LOOPBACK_NAMES, *(kubernetes_name(node.name) for node in (mesh or demo_mesh()).nodes))


_CA_CONFIG = """[ca]
default_ca = local
[local]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
copy_extensions = none
unique_subject = no
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _private(path: Path) -> None:
    os.chmod(path, 0o600)


def make_ca(directory: Path, name: str = "ca", *, days: int = 365) -> KeyPair:
    """A self-signed CA (EC P-256) as DIR/<name>.pem and DIR/<name>-key.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pair.key))
    _private(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", str(pair.key), "-sha256", "-days", str(days),
        "-subj", f"/CN=onnxmesh {name}", "-out", str(pair.cert),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(
    directory: Path,
    ca: KeyPair,
    name: str,
    names: Sequence[str] | None = None,
    *,
    days: int = 365,
    expired: bool = False,
) -> KeyPair:
    """A certificate for server and client use, signed by `ca`, as DIR/<name>.pem and
    DIR/<name>-key.pem, for `names` (default: node_names()); `expired`: valid only in 2020 (for
    tests of refusal)."""
    names = names or node_names()
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    sans = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "index.txt").write_text("")
        (work / "serial").write_text(secrets.token_hex(8) + "\n")
        (work / "ca.cnf").write_text(_CA_CONFIG.format(dir=work))
        (work / "ext.cnf").write_text(
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={sans}\n"
        )
        csr = work / "node.csr"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pair.key))
        _private(pair.key)
        _openssl("req", "-new", "-key", str(pair.key), "-subj", f"/CN={names[0]}", "-out", str(csr))
        dates = (
            ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]
            if expired
            else ["-days", str(days)]
        )
        _openssl(
            "ca", "-batch", "-notext", "-config", str(work / "ca.cnf"), "-cert", str(ca.cert),
            "-keyfile", str(ca.key), "-in", str(csr), "-out", str(pair.cert),
            "-extfile", str(work / "ext.cnf"), *dates,
        )  # fmt: skip
    return pair


def write_tokens(path: Path, count: int = 1) -> list[str]:
    """`count` random bearer tokens, one per line (0600)."""
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    path.write_text("".join(f"{t}\n" for t in tokens))
    _private(path)
    return tokens


def make_local(directory: Path) -> tuple[KeyPair, KeyPair, Path]:
    """The CA, the node certificate and the token file of a local mesh, in `directory`."""
    ca = make_ca(directory)
    node = issue(directory, ca, "node")
    tokens = directory / "tokens"
    write_tokens(tokens)
    return ca, node, tokens


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshctl.certs", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, nargs="?", default=Path("certs"))
    args = parser.parse_args(argv)
    ca, node, tokens = make_local(args.directory)
    print(f"CA {ca.cert}; node certificate {node.cert} (key {node.key}); token file {tokens}")


if __name__ == "__main__":
    main()
