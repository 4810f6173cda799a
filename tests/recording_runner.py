"""The test double for earlyfw.run's Runner seam: every command is recorded
instead of run, and `respond` scripts the answers. It lives with the tests, so
the wheel and the binary ship only the Runner that runs commands for real."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from earlyfw.run import Result, Runner


@dataclass
class RecordingRunner(Runner):
    """Records every call instead of running it; `respond` scripts the answers."""

    respond: Callable[[Sequence[str], str | None], Result] = field(default=lambda argv, input: Result(0, "", ""))
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(verbose=False)

    def _execute(self, argv: Sequence[str], input: str | None) -> Result:
        self.calls.append((tuple(argv), input))
        return self.respond(argv, input)

    def _stream(self, argv: Sequence[str]) -> Result:
        return self._execute(argv, None)

    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]
