"""qrexec-client-vm's LOCAL_PROGRAM: the caller's end of a call, as a child process.

``qrexec-client-vm TARGET SERVICE LOCAL_PROGRAM ARGS...`` connects the call
to a program of the calling qube instead of its own stdin and stdout
(qubes-core-qrexec, agent/qrexec-client-vm.c and libqrexec/exec.c): it is
started with execv (no PATH search), argv[0] = its basename, its stdin and
stdout are the call's streams, and SAVED_FD_0 / SAVED_FD_1 (SAVED_FD_2 with
PASS_LOCAL_STDERR) name copies of qrexec-client-vm's own descriptors.
"""

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

#: The status qrexec-client-vm reports when LOCAL_PROGRAM could not be executed.
EXEC_FAILED_STATUS = 255


@dataclass
class LocalProgram:
    """A started LOCAL_PROGRAM and the call's ends of its streams.

    Resource handling: owns both socketpair ends it hands out (``call_in``:
    what the program writes, ``call_out``: what it reads); they are closed
    with this object. ``process`` is None when execv failed: the program's
    output then reads EOF at once and the status is EXEC_FAILED_STATUS.
    """

    process: "subprocess.Popen[bytes] | None"
    from_program: socket.socket  #: the call reads what the program writes
    to_program: socket.socket  #: the call writes what the program reads

    @property
    def call_in(self) -> int:
        return self.from_program.fileno()

    @property
    def call_out(self) -> int:
        return self.to_program.fileno()

    def wait(self) -> int:
        """The program's status as qrexec reports it (128+N for signal N)."""
        if self.process is None:
            return EXEC_FAILED_STATUS
        returncode = self.process.wait()
        return 128 - returncode if returncode < 0 else returncode


def start(command: list[str]) -> LocalProgram:
    """Start ``command`` as qrexec-client-vm starts LOCAL_PROGRAM; a failed execv is reported.

    Error handling: an execv failure prints ``execv: REASON`` on our stderr,
    as the C program does, and yields a LocalProgram without a process.
    """
    program, *arguments = command
    to_program, program_stdin = socket.socketpair()
    from_program, program_stdout = socket.socketpair()
    saved = [os.dup(0), os.dup(1)]
    env = dict(os.environ)
    env["SAVED_FD_0"], env["SAVED_FD_1"] = str(saved[0]), str(saved[1])
    env["QREXEC_AGENT_PID"] = str(os.getpid())
    if os.environ.get("PASS_LOCAL_STDERR"):
        saved.append(os.dup(2))
        env["SAVED_FD_2"] = str(saved[2])
    process: subprocess.Popen[bytes] | None
    try:
        process = subprocess.Popen(
            [os.path.basename(program), *arguments],
            executable=program if os.sep in program else os.path.join(".", program),
            stdin=program_stdin.fileno(),
            stdout=program_stdout.fileno(),
            env=env,
            pass_fds=saved,
        )
    except OSError as error:
        print(f"execv: {error.strerror}", file=sys.stderr, flush=True)
        process = None
    finally:
        for fd in saved:
            os.close(fd)
        # The program holds its own copies (or never started: the call's
        # side then reads EOF at once).
        program_stdin.close()
        program_stdout.close()
    return LocalProgram(process, from_program, to_program)
