"""The client's pure parts: exit codes in words, refusal bursts, spec lists, limits."""

from pathlib import Path

import pytest

from qconnect.client.bursts import BurstCounter
from qconnect.client.cli import build_parser, parse_specs
from qconnect.client.limits import PROCESS_MAX_CONNECTIONS
from qconnect.client.outcome import Kind, describe_exit, policy_allow_command
from qconnect.core.errors import CommandLineError
from qconnect.core.qrexec import MAX_CALLS_IN_FLIGHT
from qconnect.core.spec import BindingSpec


def describe(code: int, target: str = "web") -> tuple[Kind, str]:
    outcome = describe_exit(code, source_qube="untrusted", target=target, remote_port=80)
    return outcome.kind, outcome.words


def test_exit_0_is_a_closed_connection() -> None:
    assert describe(0) == (Kind.OK, "closed")


def test_exit_126_names_policy_and_the_command_that_allows_it() -> None:
    kind, words = describe(126)
    assert kind is Kind.REFUSED
    assert "refused by dom0 policy" in words
    assert "qconnect policy allow untrusted --port 80 --target web" in words


def test_refused_default_target_asks_for_the_qube_to_allow() -> None:
    _, words = describe(126, target="@default")
    assert "qconnect policy allow untrusted --port 80 --default-target QUBE" in words


def test_exit_125_says_the_target_could_not_reach_the_port() -> None:
    kind, words = describe(125)
    assert kind is Kind.UNREACHABLE
    assert "could not connect to its port 80" in words


def test_exit_127_says_the_service_is_missing() -> None:
    kind, words = describe(127)
    assert kind is Kind.NO_SERVICE
    assert "web has no qubes.ConnectTCP service" in words


@pytest.mark.parametrize("code", [-15, 143])
def test_signal_exits_name_the_signal(code: int) -> None:
    kind, words = describe(code)
    assert kind is Kind.SIGNALLED
    assert "SIGTERM" in words


def test_a_killed_remote_service_is_told_apart_from_a_killed_qrexec_client_vm() -> None:
    assert "qrexec-client-vm was killed by SIGKILL" in describe(-9)[1]
    assert "the service in web was killed by SIGKILL (exit code 137)" in describe(137)[1]


def test_other_exit_codes_are_reported_as_is() -> None:
    assert describe(3) == (Kind.FAILED, "the service failed with exit code 3")


def test_policy_command_quotes_hostile_names() -> None:
    assert "'a b'" in policy_allow_command("a b", "web", 80)


def test_burst_logs_first_event_and_counts_the_rest() -> None:
    counter = BurstCounter(window=10.0)
    assert counter.record("refused", 0.0)
    assert not any(counter.record("refused", 0.001 * i) for i in range(1, 1000))
    assert counter.flush(5.0) == []
    assert counter.flush(10.0) == [("refused", 999, "events")]
    assert counter.record("refused", 11.0)


def test_burst_keys_are_independent() -> None:
    counter = BurstCounter(window=10.0)
    assert counter.record("a", 0.0)
    assert counter.record("b", 1.0)
    assert not counter.record("a", 2.0)
    assert counter.next_deadline() == 10.0
    assert counter.flush(0.0, everything=True) == [("a", 1, "events")]
    assert counter.next_deadline() is None


def test_burst_count_survives_a_new_burst_before_flush() -> None:
    counter = BurstCounter(window=10.0)
    counter.record("a", 0.0, "calls refused")
    counter.record("a", 1.0, "calls refused")
    assert counter.record("a", 20.0, "calls refused")
    assert counter.flush(21.0) == [("a", 1, "calls refused")]


def test_every_window_of_a_key_reports_its_count_with_its_words() -> None:
    # A refused binding hammered for longer than one window: each window's
    # count comes with the words that say what was counted (before, the
    # second window's count came out as "events", and a reader lost it).
    counter = BurstCounter(window=10.0)
    reported = []
    for tenth in range(0, 350):
        now = tenth / 10
        counter.record("a", now, "calls to web:80 refused")
        reported += counter.flush(now)
    reported += counter.flush(35.0, everything=True)
    assert [label for _, _, label in reported] == ["calls to web:80 refused"] * 4
    assert sum(count for _, count, _ in reported) == 350 - 4


def test_several_specs_and_bind_default() -> None:
    specs = parse_specs(["8080:web:80", "5432:db:5432", "[::1]:9000::9000"], "127.0.0.2")
    assert specs == [
        BindingSpec("127.0.0.2", 8080, "web", 80),
        BindingSpec("127.0.0.2", 5432, "db", 5432),
        BindingSpec("::1", 9000, "@default", 9000),
    ]


def test_same_local_port_twice_is_refused() -> None:
    with pytest.raises(CommandLineError, match="given twice"):
        parse_specs(["8080:web:80", "8080:db:80"], None)


def test_max_connections_stays_under_qrexec_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert PROCESS_MAX_CONNECTIONS < MAX_CALLS_IN_FLIGHT
    parser = build_parser()
    assert parser.parse_args(["--max-connections", "64", "8080:web:80"]).max_connections == 64
    for bad in (0, -1, MAX_CALLS_IN_FLIGHT):
        with pytest.raises(SystemExit):
            parser.parse_args([f"--max-connections={bad}", "8080:web:80"])
        assert "--max-connections" in capsys.readouterr().err


def test_non_loopback_bind_warns_that_other_qubes_can_connect(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from qconnect.client.cli import _warn_exposed

    _warn_exposed([BindingSpec("0.0.0.0", 8080, "web", 80), BindingSpec("::1", 8081, "web", 80)])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "qvm-connect-tcp: warning: listening on 0.0.0.0:8080, not a loopback address: other "
        "qubes on that network can connect to web:80 through this qube"
    ]


def test_registry_skips_a_process_that_closes_without_answering_and_drops_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import threading

    from qconnect.client import control, registry

    monkeypatch.setenv(registry.RUNTIME_DIR_ENV, str(tmp_path))
    directory = registry.ensure_runtime_dir()
    exiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    exiting.bind(str(directory / "100.sock"))
    exiting.listen()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(directory / "200.sock"))
    dead.close()  # its file stays, nobody listens: a crashed process's leftover

    def close_without_answer() -> None:
        conn, _ = exiting.accept()
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=close_without_answer)
    thread.start()
    assert control.ask_all(control.STATUS) == []
    thread.join()
    exiting.close()
    assert sorted(path.name for path in directory.iterdir()) == ["100.sock"]
