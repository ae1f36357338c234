"""The qubes of a machine as dom0's policy sees them.

Policy evaluation needs each qube's type, tags, default disposable template,
whether it is a disposable template and whether it runs. qubesd hands exactly
that to the policy daemon as the JSON of ``internal.GetSystemInfo``; we read
the same JSON (from a file, or from qubesd when running in dom0) so a
decision here is the decision dom0 makes.
"""

import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qconnect.core.errors import PolicyError

# qubesd's internal socket and the dom0 client that talks to it
# (qubes-core-admin): the same call the policy daemon makes.
QUBESD_QUERY = "qubesd-query"
QUBESD_INTERNAL_SOCKET = "/var/run/qubesd.internal.sock"

# qubesd answers in well under a second; past this something is wrong and
# the user is better served by an error than by a hung tool.
QUBESD_TIMEOUT_SECONDS = 20

# A machine description is a few kB per qube; refuse absurd input early
# rather than letting json build a huge structure.
MAX_SYSTEM_INFO_BYTES = 16 * 1024 * 1024

# dom0's own names: qrexec treats "dom0", "@adminvm" and the all-zero UUID as
# the same admin qube.
DOM0_NAMES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})


def is_dom0(name: str) -> bool:
    """Whether ``name`` designates dom0 (qrexec's ``is_dom0``)."""
    return name in DOM0_NAMES


@dataclass(frozen=True)
class QubeInfo:
    """One qube's entry of ``internal.GetSystemInfo``: what policy matching reads."""

    name: str
    type: str = "AppVM"
    tags: frozenset[str] = frozenset()
    default_dispvm: str | None = None
    template_for_dispvms: bool = False
    power_state: str = "Halted"
    internal: bool = False
    uuid: str | None = None


@dataclass(frozen=True)
class SystemInfo:
    """Every qube of a machine, by name."""

    domains: Mapping[str, QubeInfo] = field(default_factory=lambda: MappingProxyType({}))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def __iter__(self) -> Iterator[QubeInfo]:
        return iter(self.domains.values())

    def lookup(self, name: str) -> QubeInfo | None:
        """The qube named ``name`` (or ``uuid:UUID``), None when there is none."""
        if name.startswith("uuid:"):
            wanted = name[len("uuid:") :]
            return next((q for q in self.domains.values() if q.uuid == wanted), None)
        return self.domains.get(name)

    def canonical(self, name: str) -> str:
        """``name`` with a ``uuid:`` form replaced by the qube's name when known."""
        qube = self.lookup(name) if name.startswith("uuid:") else None
        return qube.name if qube is not None else name

    @classmethod
    def from_dict(cls, document: Any, *, origin: str = "system info") -> "SystemInfo":
        """Build from the decoded GetSystemInfo JSON, refusing a malformed one by name."""
        if not isinstance(document, dict) or not isinstance(document.get("domains"), dict):
            raise PolicyError(f'{origin}: expected a JSON object {{"domains": {{NAME: {{...}}}}}}')
        domains: dict[str, QubeInfo] = {}
        for name, entry in document["domains"].items():
            if name.startswith("uuid:"):
                continue  # the policy daemon's own uuid aliases, not qubes
            domains[name] = _qube_from_entry(name, entry, origin)
        return cls(MappingProxyType(domains))

    @classmethod
    def load(cls, path: Path) -> "SystemInfo":
        """Read a GetSystemInfo JSON file (``--qubes FILE``)."""
        try:
            with path.open("rb") as stream:
                raw = stream.read(MAX_SYSTEM_INFO_BYTES + 1)
        except OSError as error:
            raise PolicyError(f"cannot read qubes description {path}: {error.strerror}") from None
        if len(raw) > MAX_SYSTEM_INFO_BYTES:
            raise PolicyError(
                f"{path}: qubes description larger than {MAX_SYSTEM_INFO_BYTES} bytes"
            )
        return cls.from_json(raw, origin=str(path))

    @classmethod
    def from_json(cls, raw: bytes | str, *, origin: str) -> "SystemInfo":
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise PolicyError(f"{origin}: not valid JSON: {error}") from None
        return cls.from_dict(document, origin=origin)

    @classmethod
    def from_running_system(cls) -> "SystemInfo":
        """Describe the qubes of the running dom0, or say clearly why that is impossible.

        First as the policy daemon does (qubesd's internal socket, needs root),
        then through the Admin API (``qubesadmin``, what qvm-ls uses) for a
        dom0 user without root.
        """
        reasons = []
        for source in (cls._from_qubesd, cls._from_admin_api):
            try:
                return source()
            except PolicyError as error:
                reasons.append(str(error))
        raise PolicyError(
            "cannot describe the qubes (" + "; ".join(reasons) + "): pass --qubes FILE with "
            "the JSON of qubesd's internal.GetSystemInfo"
        )

    @classmethod
    def _from_qubesd(cls) -> "SystemInfo":
        query = shutil.which(QUBESD_QUERY)
        if query is None or not Path(QUBESD_INTERNAL_SOCKET).exists():
            raise PolicyError(f"this is not dom0: no {QUBESD_QUERY} or {QUBESD_INTERNAL_SOCKET}")
        command = [
            query,
            "-e",
            "--fail",
            "-c",
            QUBESD_INTERNAL_SOCKET,
            "dom0",
            "internal.GetSystemInfo",
            "dom0",
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, timeout=QUBESD_TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PolicyError(f"{QUBESD_QUERY} failed: {error}") from None
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip().splitlines()
            raise PolicyError(
                "qubesd refused internal.GetSystemInfo"
                + (f": {reason[-1]}" if reason else f" (exit {done.returncode})")
            )
        return cls.from_json(done.stdout, origin="qubesd internal.GetSystemInfo")

    @classmethod
    def _from_admin_api(cls) -> "SystemInfo":
        try:
            import qubesadmin  # type: ignore[import-not-found]  # dom0's Admin API client
        except ImportError:
            raise PolicyError("no Admin API (the qubesadmin module is missing)") from None
        domains: dict[str, object] = {}
        try:
            for vm in qubesadmin.Qubes().domains:
                default_dispvm = getattr(vm, "default_dispvm", None)
                domains[str(vm.name)] = {
                    "type": str(vm.klass),
                    "tags": sorted(str(tag) for tag in vm.tags),
                    "default_dispvm": None if default_dispvm is None else str(default_dispvm),
                    "template_for_dispvms": bool(getattr(vm, "template_for_dispvms", False)),
                    "power_state": str(vm.get_power_state()),
                    "internal": bool(vm.features.get("internal", False)),
                }
        except Exception as error:  # qubesadmin raises many kinds; all mean "cannot list"
            raise PolicyError(f"the Admin API could not list the qubes: {error}") from None
        return cls.from_dict({"domains": domains}, origin="the Admin API")


def _qube_from_entry(name: str, entry: Any, origin: str) -> QubeInfo:
    where = f"{origin}: qube {name!r}"
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: expected an object")

    def text(key: str, default: str | None) -> str | None:
        value = entry.get(key, default)
        if value is not None and not isinstance(value, str):
            raise PolicyError(f"{where}: {key!r} is {value!r}, expected a string")
        return value

    def flag(key: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: {key!r} is {value!r}, expected true or false")
        return value

    tags = entry.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise PolicyError(f"{where}: 'tags' is {tags!r}, expected a list of strings")
    return QubeInfo(
        name=name,
        type=text("type", "AppVM") or "AppVM",
        tags=frozenset(tags),
        default_dispvm=text("default_dispvm", None),
        template_for_dispvms=flag("template_for_dispvms"),
        power_state=text("power_state", "Halted") or "Halted",
        internal=flag("internal"),
        uuid=text("uuid", None),
    )
