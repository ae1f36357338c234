"""A policy directory, with its includes, to the ordered list of rules dom0 evaluates.

dom0 reads ``/etc/qubes/policy.d/*.policy`` in C order of the file name and
follows ``!include``, ``!include-dir``, ``!include-service`` and
``!compat-4.0`` where they stand. A file whose name is not lowercase
``[0-9a-z_.-]`` makes dom0 refuse *every* call, so it is refused here too;
files without the ``.policy`` suffix and dot-files are ignored, as there.

``overrides`` lets the editor check the directory as it would be after an
edit (new content for a path, or None for a removed file) before writing.
"""

import contextlib
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qconnect.core.errors import PolicyError
from qconnect.policy import legacy
from qconnect.policy.parser import (
    Compat40,
    Entry,
    ErrorSink,
    Include,
    IncludeDir,
    IncludeService,
    fail,
    parse_text,
)
from qconnect.policy.rules import Location, Rule

#: dom0's policy directory (R4.1+).
POLICY_DIR = Path("/etc/qubes/policy.d")
POLICY_SUFFIX = ".policy"

# qrexec's FILENAME_ALLOWED_CHARSET: any other character in a *.policy name
# makes dom0 refuse the whole policy.
FILE_NAME_CHARS = frozenset(string.digits + string.ascii_lowercase + "_.-")

Overrides = Mapping[Path, str | None]


def default_legacy_dir(policy_dir: Path) -> Path:
    """Where !compat-4.0 reads R4.0 files: ``/etc/qubes-rpc/policy`` beside ``/etc/qubes/policy.d``.

    Derived from the policy directory so that a loopback machine rooted
    elsewhere (``ROOT/etc/qubes/policy.d``) reads its own ``ROOT/etc/qubes-rpc/policy``.
    """
    return policy_dir.parent.parent / "qubes-rpc" / "policy"


def invalid_file_name(name: str) -> bool:
    return not set(name) <= FILE_NAME_CHARS


@dataclass(frozen=True)
class Policy:
    """The rules in evaluation order, and every file they were read from."""

    rules: tuple[Rule, ...]
    files: tuple[Path, ...] = field(default=())

    def rules_for(self, service: str) -> Iterator[Rule]:
        """The rules that can decide a call to ``service``, in order."""
        return (rule for rule in self.rules if rule.service in (None, service))


@dataclass
class _Loader:
    policy_dir: Path
    legacy_dir: Path
    overrides: Overrides
    on_error: ErrorSink
    rules: list[Rule] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    stack: list[Path] = field(default_factory=list)
    in_compat: bool = False

    # -- files --------------------------------------------------------------

    def display(self, path: Path) -> str:
        """A path as errors and rule locations show it: relative to the policy directory."""
        try:
            return str(path.relative_to(self.policy_dir))
        except ValueError:
            return str(path)

    def exists(self, path: Path) -> bool:
        if path in self.overrides:
            return self.overrides[path] is not None
        return path.is_file()

    def read(self, path: Path, where: Location | None) -> str:
        override = self.overrides.get(path, ...)
        if isinstance(override, str):
            return override
        if override is None or not path.is_file():
            raise fail(where, f"not a file: {path}")
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise PolicyError(
                f"not valid UTF-8 (byte {error.start})", file=self.display(path)
            ) from None
        except OSError as error:
            raise fail(where, f"cannot read {path}: {error.strerror}") from None

    def listing(self, directory: Path, where: Location | None, what: str) -> set[Path]:
        """The regular files of ``directory`` as they would be with the overrides applied."""
        try:
            listed = {path for path in directory.iterdir() if path.is_file()}
        except OSError as error:
            raise fail(where, f"cannot read {what} {directory}: {error.strerror}") from None
        for path, content in self.overrides.items():
            if path.parent == directory:
                (listed.add if content is not None else listed.discard)(path)
        return listed

    def directory_files(self, directory: Path, where: Location | None) -> list[Path]:
        """dom0's filter: ``*.policy`` regular files, no dot-files; any bad name refuses all."""
        listed = self.listing(directory, where, "policy directory")
        chosen = sorted(
            (
                path
                for path in listed
                if path.suffix == POLICY_SUFFIX and not path.name.startswith(".")
            ),
            key=lambda path: path.name.encode(),
        )
        for path in chosen:
            if invalid_file_name(path.name):
                self.report(
                    PolicyError(
                        f"invalid policy file name {path.name!r}: expected lowercase letters, "
                        "digits, '_', '.' or '-' (dom0 refuses every call while it is there)",
                        file=self.display(path),
                    )
                )
                return [p for p in chosen if not invalid_file_name(p.name)]
        return chosen

    def report(self, error: PolicyError) -> None:
        if self.on_error is None:
            raise error
        self.on_error(error)

    def resolve(self, included: str, base: Path) -> Path:
        return (base / included).resolve()

    def enter(self, path: Path, where: Location | None) -> None:
        if path in self.stack:
            message = f"include loop: {self.display(path)} includes itself"
            if where is None:
                raise PolicyError(message, file=self.display(path))
            raise fail(where, message)
        self.stack.append(path)
        self.files.append(path)

    # -- walking ------------------------------------------------------------

    def load_file(self, path: Path, where: Location | None) -> None:
        text = self.read(path, where)
        self.enter(path, where)
        try:
            self.handle(parse_text(text, self.display(path), on_error=self.on_error))
        finally:
            self.stack.pop()

    def load_dir(self, directory: Path, where: Location | None) -> None:
        for path in self.directory_files(directory, where):
            with self.reporting():
                self.load_file(path, where)

    def load_service_file(
        self, service: str | None, argument: str | None, path: Path, where: Location | None
    ) -> None:
        text = self.read(path, where)
        self.enter(path, where)
        try:
            entries = legacy.parse_legacy_text(
                text, self.display(path), service, argument, on_error=self.on_error
            )
            base = self.legacy_dir if self.in_compat else self.policy_dir
            for entry in entries:
                if isinstance(entry, Include):
                    with self.reporting():
                        included = self.resolve(entry.path, base)
                        self.load_service_file(service, argument, included, entry.location)
                else:
                    self.rules.append(entry)
        finally:
            self.stack.pop()

    @contextlib.contextmanager
    def reporting(self) -> Iterator[None]:
        """Hand an error to ``on_error`` and go on (lint), or let it stop the load (dom0)."""
        try:
            yield
        except PolicyError as error:
            self.report(error)

    def handle(self, entries: list[Entry]) -> None:
        for entry in entries:
            with self.reporting():
                if isinstance(entry, Rule):
                    self.rules.append(entry)
                elif isinstance(entry, Include):
                    path = self.resolve(entry.path, self.policy_dir)
                    self.load_file(path, entry.location)
                elif isinstance(entry, IncludeDir):
                    directory = self.resolve(entry.path, self.policy_dir)
                    if not directory.is_dir():
                        raise fail(entry.location, f"not a directory: {directory}")
                    self.load_dir(directory, entry.location)
                elif isinstance(entry, IncludeService):
                    path = self.resolve(entry.path, self.policy_dir)
                    self.load_service_file(entry.service, entry.argument, path, entry.location)
                else:
                    self.compat40(entry)

    def compat40(self, directive: Compat40) -> None:
        if self.in_compat:
            raise fail(directive.location, "!compat-4.0 is not recursive")
        if not self.legacy_dir.is_dir():
            raise fail(
                directive.location,
                f"!compat-4.0: legacy policy directory {self.legacy_dir} does not exist",
            )
        self.in_compat = True
        try:
            self.load_legacy_dir(self.legacy_dir, directive.location)
        finally:
            self.in_compat = False

    def legacy_files(self, directory: Path, where: Location | None) -> list[legacy.LegacyFile]:
        """The R4.0 files !compat-4.0 reads, in its order, edits included."""
        listed = self.listing(directory, where, "legacy policy directory")
        return legacy.order_legacy_files(
            path for path in listed if legacy.is_legacy_file_name(path.name)
        )

    def load_legacy_dir(self, directory: Path, where: Location | None) -> None:
        for legacy_file in self.legacy_files(directory, where):
            with self.reporting():
                self.load_service_file(
                    legacy_file.service, legacy_file.argument, legacy_file.path, None
                )
            if legacy_file.argument is not None:
                self.rules.extend(
                    legacy.implicit_denies(
                        legacy_file.service, legacy_file.argument, self.display(legacy_file.path)
                    )
                )


def load_policy(
    policy_dir: Path,
    *,
    legacy_dir: Path | None = None,
    overrides: Overrides | None = None,
    on_error: ErrorSink = None,
) -> Policy:
    """Every rule of ``policy_dir`` as dom0 reads it; PolicyError when dom0 would refuse it."""
    loader = _Loader(
        policy_dir,
        legacy_dir if legacy_dir is not None else default_legacy_dir(policy_dir),
        overrides or {},
        on_error,
    )
    loader.load_dir(policy_dir, None)
    return Policy(tuple(loader.rules), tuple(loader.files))


def load_legacy_policy(
    legacy_dir: Path, *, overrides: Overrides | None = None, on_error: ErrorSink = None
) -> Policy:
    """Every rule of an R4.0 directory, in the order (and with the implicit denies) R4.0 uses."""
    loader = _Loader(legacy_dir, legacy_dir, overrides or {}, on_error, in_compat=True)
    loader.load_legacy_dir(legacy_dir, None)
    return Policy(tuple(loader.rules), tuple(loader.files))
