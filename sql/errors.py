"""The error of a query the client got wrong, shared by the planner, its size checks and the engine."""


class QueryError(Exception):
    """A mistake in the query; `line`/`column` locate it when known (1-based)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
