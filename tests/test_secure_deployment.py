"""A secure Flower deployment on loopback: TLS, SuperNode authentication, 2 rounds end to end.

One SuperLink with TLS and `--enable-supernode-auth`, two SuperNodes whose public keys were
registered with `flwr supernode register`, and a `flwr run` of the tiny model for 2 rounds, all
as separate processes on free ports, with Flower's config in a temp FLWR_HOME (the user's
~/.flwr is never touched). Intruders try to join meanwhile and must stay out: a SuperNode with a
key nobody registered is refused; a SuperNode without TLS is never told why it cannot connect:
it retries for ever (or gives up after --max-retries), as the README says. The certificates and keys are made
at test time by fl_diloco/certificates.py, as the README tells sites to make theirs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fl_diloco.certificates import make_node_key, make_superlink_certificates

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr of this venv
CONNECTION = "secure-test"
RUN_CONFIG = ('model="tiny" num_clients=2 inner_steps=4 rounds=2 batch_size=4 seq_len=32 '
              'max_documents=150 eval_sequences=32 eval_every=1 warmup_steps=2 threads_per_worker=1')
# A loaded 2-core CI machine needs minutes for what takes seconds on an idle one (every
# ClientApp is a fresh process importing torch); the limits only catch a hang.
RUN_TIMEOUT = 600
CLI_TIMEOUT = 120

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason=f"flower-superlink is not installed next to {sys.executable}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def children(pid: int) -> list[int]:
    """All descendants of `pid` still alive, from /proc (Flower detaches its SuperExec
    processes into their own sessions, so killing a process group misses them)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every started process's group and every descendant, then SIGKILL what is left."""
    descendants = [pid for p in processes for pid in children(p.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in processes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for pid in descendants:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in processes):
            break


class Deployment:
    """The processes of one test, each in its own process group with its log in `log_dir`."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.processes: list[subprocess.Popen] = []

    @classmethod
    def in_temp_dir(cls, tmp_path: Path, connection: str, settings: str) -> Deployment:
        """Logs in tmp_path/logs; `flwr` reads a fresh FLWR_HOME, tmp_path/flwr, that holds only
        `connection` (its config.toml lines `settings`): the user's ~/.flwr is never touched.
        FL_DILOCO_CACHE and FL_DILOCO_RUNTIME_DIR (tests/conftest.py) pass through to the
        ServerApp and the workers; the SuperLink must not install the app's dependencies."""
        (tmp_path / "logs").mkdir()
        (tmp_path / "flwr").mkdir()
        (tmp_path / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n{settings}\n')
        env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        return cls(tmp_path / "logs", env)

    def start(self, name: str, *command: str) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=ROOT, env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str) -> str:
        """Run the `flwr` CLI against our connection; its stdout, or a failure with its output."""
        result = subprocess.run([str(BIN / "flwr"), *args], check=False, cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert result.returncode == 0, f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def wait_for_log(self, name: str, process: subprocess.Popen, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            assert process.poll() is None, f"{name} exited while starting:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"no '{text}' from {name} in {timeout}s:\n{self.log(name)[-3000:]}"
            time.sleep(0.2)

    def wait_for_summary(self, out_dir: Path, run_id: str, watched: list[subprocess.Popen]) -> dict:
        """The run's summary.json once the ServerApp has written it; fails with every log when
        RUN_TIMEOUT passes or a `watched` process dies first."""
        summary_path = out_dir / "summary.json"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not summary_path.exists():
            assert time.monotonic() < deadline, f"run {run_id}: no summary.json after {RUN_TIMEOUT}s\n{self.diagnostics()}"
            assert all(p.poll() is None for p in watched), f"run {run_id}: a process died\n{self.diagnostics()}"
            time.sleep(1)
        return json.loads(summary_path.read_text())

    def diagnostics(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for path in sorted(self.log_dir.glob("*.log")))


def json_from(output: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (Flower may print a line before it)."""
    return json.loads(output[output.index("{"):])


def assert_plain_http_is_refused(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.request("GET", "/health")
            connection.getresponse()
    finally:
        connection.close()


def https_health(port: int, ca_file: Path | None) -> int:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    finally:
        connection.close()


def test_certificates_are_what_flower_accepts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    tls = make_superlink_certificates(tmp_path, hosts=["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(tls["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(tls["server.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]

    private_path, public_path = make_node_key(tmp_path / "site-a")
    for secret in (tls["ca.key"], tls["server.key"], private_path):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    # Read the way flower-supernode and `flwr supernode register` read them.
    private_key = load_ssh_private_key(private_path.read_bytes(), None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public_path) == public_key_to_bytes(private_key.public_key())

    with pytest.raises(FileExistsError):
        make_node_key(private_path)
    with pytest.raises(FileExistsError):
        make_superlink_certificates(tmp_path)


def test_tls_and_supernode_auth_train_two_rounds_and_refuse_intruders(tmp_path):
    certs, out_dir = tmp_path / "certs", tmp_path / "run"
    tls = make_superlink_certificates(certs)
    keys = {name: make_node_key(certs / name) for name in ("site-0", "site-1", "intruder")}

    superlink_port, *node_ports = free_ports(6)
    superlink = f"127.0.0.1:{superlink_port}"
    deployment = Deployment.in_temp_dir(tmp_path, CONNECTION,
                                        f'address = "{superlink}"\nroot-certificates = "{tls["ca.crt"]}"')
    try:
        link = deployment.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(tls["ca.crt"]),
                                "--ssl-certfile", str(tls["server.crt"]), "--ssl-keyfile", str(tls["server.key"]),
                                "--enable-supernode-auth", "--host", "127.0.0.1",
                                "--port", str(superlink_port), "--database", str(tmp_path / "superlink.db"))
        deployment.wait_for_log("superlink", link, "Uvicorn running on https://", timeout=120)

        # The port speaks TLS only, with a certificate that verifies against our CA alone.
        assert_plain_http_is_refused(superlink_port)
        with pytest.raises(ssl.SSLCertVerificationError):
            https_health(superlink_port, ca_file=None)
        assert https_health(superlink_port, ca_file=tls["ca.crt"]) == 200

        registered = {str(json_from(deployment.flwr("supernode", "register", str(keys[site][1]), CONNECTION,
                                                    "--format", "json"))["node-id"])
                      for site in ("site-0", "site-1")}
        assert len(registered) == 2

        for i in range(2):
            deployment.start(f"site-{i}", "flower-supernode", "--superlink", superlink,
                             "--root-certificates", str(tls["ca.crt"]),
                             "--auth-supernode-private-key", str(keys[f"site-{i}"][0]),
                             "--port", str(node_ports[i]), "--node-config", f"partition-id={i} num-partitions=2")
        # Intruders: a valid TLS client whose key was never registered, and a node without TLS.
        # --max-retries makes a refused node give up instead of retrying forever.
        intruder = deployment.start("intruder", "flower-supernode", "--superlink", superlink,
                                    "--root-certificates", str(tls["ca.crt"]),
                                    "--auth-supernode-private-key", str(keys["intruder"][0]),
                                    "--max-retries", "2", "--port", str(node_ports[2]),
                                    "--node-config", "partition-id=0 num-partitions=2")
        insecure = deployment.start("insecure", "flower-supernode", "--insecure", "--superlink", superlink,
                                    "--max-retries", "2", "--port", str(node_ports[3]),
                                    "--node-config", "partition-id=1 num-partitions=2")
        retrying = deployment.start("insecure-retrying", "flower-supernode", "--insecure", "--superlink",
                                    superlink, "--port", str(node_ports[4]),
                                    "--node-config", "partition-id=1 num-partitions=2")

        run_id = json_from(deployment.flwr("run", ".", CONNECTION, "--run-config",
                                           f'{RUN_CONFIG} out_dir="{out_dir}"', "--format", "json"))["run-id"]

        for name, process in (("intruder", intruder), ("insecure", insecure)):
            process.wait(timeout=CLI_TIMEOUT)
            log = deployment.log(name)
            assert process.returncode != 0, f"{name} SuperNode did not fail:\n{log}"
            assert "SuperNode ID:" not in log, f"{name} SuperNode got a node ID:\n{log}"
        assert "Failed to activate SuperNode" in deployment.log("intruder")
        # The plaintext node fails at the transport, before authentication has its say.
        assert "Server disconnected without sending a response" in deployment.log("insecure")
        assert "No SuperNode found with the given public key" in deployment.log("superlink")

        summary = deployment.wait_for_summary(out_dir, run_id, watched=[link])
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

        assert summary["rounds"] == 2 and summary["num_clients"] == 2
        assert math.isfinite(summary["first_eval_loss"]) and math.isfinite(summary["final_eval_loss"])
        assert [r["round"] for r in records] == [0, 1, 2]
        for record in records[1:]:
            assert math.isfinite(record["train_loss"]) and math.isfinite(record["eval_loss"])
            # Exactly the two registered nodes trained, in every round.
            assert {str(c["node_id"]) for c in record["clients"]} == registered

        nodes = json_from(deployment.flwr("supernode", "list", CONNECTION, "--format", "json"))["nodes"]
        assert {str(n["node-id"]) for n in nodes if n["status"] == "online"} == registered
        # Without --max-retries a plaintext node is not refused: it retries for ever, and its
        # log never says why (README, "Each training site").
        log = deployment.log("insecure-retrying")
        assert retrying.poll() is None, f"the plaintext SuperNode stopped retrying:\n{log}"
        assert "Connection attempt failed, retrying in" in log and "SuperNode ID:" not in log, log
    finally:
        stop_all(deployment.processes)


def _uid_of(pid: int) -> int:
    """The real uid of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_local_deployment_started_with_sudo_runs_as_the_invoking_user():
    """`sudo scripts/local_deployment.sh up`: every process runs as $SUDO_USER, not root, since
    any local account can submit a run whose ServerApp runs as the SuperLink's user."""
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account to stand for the user who invoked sudo")
    usable = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                             "env", sys.executable, "-c", "import fl_diloco, flwr"], capture_output=True, check=False)
    if usable.returncode != 0:
        pytest.skip(f"'nobody' cannot run {sys.executable} with fl_diloco (it lives in a private folder?)")
    # A folder that user can write (pytest's own temp tree is private to root).
    base = Path(tempfile.mkdtemp(prefix="fl-diloco-sudo-"))
    os.chown(base, user.pw_uid, user.pw_gid)
    superlink_port, node_port = free_ports(2)
    env = {**os.environ, "SUDO_USER": "nobody", "PYTHON": sys.executable, "FLWR_HOME": str(base / "flwr"),
           "FL_DILOCO_DEPLOYMENT_DIR": str(base / "deployment"), "FLWR_TELEMETRY_ENABLED": "0",
           "FL_DILOCO_SUPERLINK_PORT": str(superlink_port), "FL_DILOCO_SUPERNODE_PORT": str(node_port),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = [str(ROOT / "scripts" / "local_deployment.sh")]
    pids_file = base / "deployment" / "pids"
    try:
        up = subprocess.run([*script, "up", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=False)
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        assert "WARNING: running as root" not in up.stderr
        started = dict(line.split() for line in pids_file.read_text().splitlines())
        assert set(started) == {"superlink", "supernode-0"}
        for name, pid in started.items():
            processes = [int(pid), *children(int(pid))]
            assert {_uid_of(p) for p in processes} == {user.pw_uid}, name
    finally:
        subprocess.run([*script, "down"], cwd=ROOT, env=env, capture_output=True, timeout=CLI_TIMEOUT,
                       check=False)
        if pids_file.exists():  # down failed: stop what is left, by pid
            for line in pids_file.read_text().splitlines():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[1]), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
