"""The client's part of ``qconnect demo``: a binding at work on a loopback machine.

untrusted runs ``qvm-connect-tcp``; mytcp-service runs a web server and
qubes.ConnectTCP; dom0's policy, written with ``qconnect policy``, allows one
port. A real HTTP client fetches a page through the binding, a call to a port
without a rule is refused and logged, ``qconnect list`` shows the binding and
``qconnect stop`` ends it. Every command shown is run as shown; every output
is its real output.
"""

import atexit
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from qconnect.demo import Machine, Step

#: Seconds to wait for the web server to listen (a fresh interpreter starting).
SERVER_START_TIMEOUT = 20.0

#: Seconds a demo command may take (they all return in well under a second).
COMMAND_TIMEOUT = 60.0

#: The port dom0 has no rule for, so the call to it is refused (ssh's).
REFUSED_PORT = 22

PAGE = "<h1>Hello from mytcp-service</h1>\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _Demo:
    """What the client's steps share: the loopback machine, ports, processes to clean up."""

    machine: Machine
    web_port: int = field(default_factory=_free_port)
    local_port: int = field(default_factory=_free_port)
    refused_local_port: int = field(default_factory=_free_port)
    web_server: "subprocess.Popen[bytes] | None" = None
    started_client: bool = False

    @property
    def loopback(self) -> Path:
        return self.machine.root / "loopback"

    @property
    def client_log(self) -> Path:
        return self.loopback / "untrusted-qvm-connect-tcp.log"

    def env(self) -> dict[str, str]:
        """Our environment, with the virtualenv's commands (qconnect, qvm-connect-tcp) on PATH."""
        env = dict(os.environ)
        scripts = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([scripts, env.get("PATH", os.defpath)])
        return env

    def shown(self, word: str) -> str:
        text = word.replace(str(self.loopback), "$LOOPBACK")
        return text if text != word else shlex.quote(word)

    def run(self, *words: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        """Run a command as shown, print its output; a failing step stops the demo."""
        self.machine.say("$ " + " ".join(self.shown(word) for word in words))
        result = subprocess.run(
            list(words),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        for line in (result.stdout + result.stderr).splitlines():
            self.machine.say("  " + line.replace(str(self.loopback), "$LOOPBACK"))
        if check and result.returncode != 0:
            raise RuntimeError(f"{words[0]} failed with exit status {result.returncode}")
        return result

    def in_qube(self, qube: str, *words: str) -> "subprocess.CompletedProcess[str]":
        return self.run("qconnect", "loopback", "run", str(self.loopback), qube, "--", *words)

    def clean_up(self) -> None:
        """Stop what the demo started, whatever step it got to (also run at exit)."""
        if self.started_client:
            self.started_client = False
            in_untrusted = ["qconnect", "loopback", "run", str(self.loopback), "untrusted", "--"]
            subprocess.run(
                [*in_untrusted, "qconnect", "stop", "--all"],
                env=self.env(),
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        if self.web_server is not None and self.web_server.poll() is None:
            self.web_server.terminate()
            self.web_server.wait(timeout=COMMAND_TIMEOUT)


def client_steps() -> list[Step]:
    """The client, end to end, on a loopback machine (issue 4)."""
    state: dict[str, _Demo] = {}

    def demo(machine: Machine) -> _Demo:
        if "demo" not in state:
            state["demo"] = _Demo(machine)
            atexit.register(state["demo"].clean_up)
        return state["demo"]

    def create(machine: Machine) -> None:
        d = demo(machine)
        machine.say(f"LOOPBACK={d.loopback}")
        machine.say(
            "A loopback machine plays a Qubes system on this host: its qrexec-client-vm applies "
            "dom0's policy and runs the target qube's service."
        )
        d.run(
            "qconnect", "loopback", "init", str(d.loopback), "--qube", "untrusted",
            "--qube", "mytcp-service",
        )  # fmt: skip

    def serve(machine: Machine) -> None:
        d = demo(machine)
        www = d.loopback / "www"
        www.mkdir()
        (www / "index.html").write_text(PAGE)
        words = [
            "qconnect", "loopback", "run", str(d.loopback), "mytcp-service", "--",
            "python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www),
            str(d.web_port),
        ]  # fmt: skip
        machine.say("$ " + " ".join(d.shown(word) for word in words) + " &")
        d.web_server = subprocess.Popen(
            words, env=d.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", d.web_port), timeout=1),
            ):
                break
            if time.monotonic() > deadline or d.web_server.poll() is not None:
                raise RuntimeError("the web server in mytcp-service did not start")
            time.sleep(0.05)
        machine.say(f"  (the web server listens on 127.0.0.1:{d.web_port} in mytcp-service)")
        machine.say(
            "qubes.ConnectTCP in mytcp-service: the executable form, one small process per call."
        )
        rpc = d.loopback / "qubes" / "mytcp-service"
        d.run(
            "qconnect", "service", "install", "--rpc-dir", str(rpc / "rpc"),
            "--rpc-config-dir", str(rpc / "rpc-config"),
        )  # fmt: skip

    def allow(machine: Machine) -> None:
        d = demo(machine)
        d.run(
            "qconnect", "policy", "allow", "untrusted", "--port", str(d.web_port),
            "--target", "mytcp-service", "--policy-dir", str(d.loopback / "policy.d"),
            "--qubes", str(d.loopback / "qubes.json"),
        )  # fmt: skip

    def bind(machine: Machine) -> None:
        d = demo(machine)
        machine.say(
            f"Two bindings: local port {d.local_port} to the web server, and local port "
            f"{d.refused_local_port} to port {REFUSED_PORT}, which no policy rule allows."
        )
        d.started_client = True
        result = d.in_qube(
            "untrusted", "qvm-connect-tcp", "--log-file", str(d.client_log),
            f"{d.local_port}:mytcp-service:{d.web_port}",
            f"{d.refused_local_port}:mytcp-service:{REFUSED_PORT}",
        )  # fmt: skip
        machine.say(
            f"  (exit status {result.returncode}: both ports are bound and the bindings "
            "run in the background, so rc.local can use it)"
        )

    def fetch(machine: Machine) -> None:
        d = demo(machine)
        url = f"http://127.0.0.1:{d.local_port}/"
        machine.say(f">>> urllib.request.urlopen({url!r})")
        with urllib.request.urlopen(url, timeout=COMMAND_TIMEOUT) as response:
            body = response.read().decode(errors="replace")
            machine.say(f"  {response.status} {response.reason}")
        for line in body.splitlines():
            machine.say(f"  {line}")

    def refuse(machine: Machine) -> None:
        d = demo(machine)
        machine.say(f">>> a TCP connection to 127.0.0.1:{d.refused_local_port}")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", d.refused_local_port), timeout=10) as conn:
            try:
                data = conn.recv(100)
                outcome = "closed" if not data else f"received {data!r}"
            except ConnectionResetError:
                outcome = "reset"
        machine.say(f"  {outcome} by the binding after {time.monotonic() - started:.2f} s")
        # The binding logs the call once its qrexec-client-vm is reaped, a moment
        # after the connection closed.
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while "refused" not in d.client_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        machine.say("What the binding logged, and what dom0 logged:")
        d.run("grep", "refused", str(d.client_log))
        d.run("grep", f"+{REFUSED_PORT} ", str(d.loopback / "log" / "qrexec.log"))

    def show(machine: Machine) -> None:
        demo(machine).in_qube("untrusted", "qconnect", "list")

    def stop(machine: Machine) -> None:
        d = demo(machine)
        d.in_qube("untrusted", "qconnect", "stop", "--all")
        d.started_client = False
        d.in_qube("untrusted", "qconnect", "list")
        d.clean_up()
        machine.say("  (stopped the web server)")

    return [
        Step("A loopback machine: untrusted and mytcp-service", create),
        Step("mytcp-service: a web server and qubes.ConnectTCP", serve),
        Step("dom0: allow untrusted to reach the web server's port", allow),
        Step("untrusted: qvm-connect-tcp", bind),
        Step("untrusted: a real HTTP client fetches a page through the binding", fetch),
        Step("untrusted: a call dom0 refuses", refuse),
        Step("untrusted: the running bindings", show),
        Step("untrusted: stop the bindings, clean up", stop),
    ]
