"""The process exit codes of every command, and what each means: one table for cron, --help and the report."""

from __future__ import annotations

EXIT_OK = 0  # every row ok or filtered
EXIT_ROW_ERRORS = 1  # some rows ended in error (they are committed with the reason)
EXIT_USAGE = 2  # bad usage or config
EXIT_REFUSED = 3  # the endpoint refused us: key, deployment, route, or a quota that is gone
EXIT_OUTPUT_FAILED = 4  # the output could not be written (disk full, permissions); committed rows stay valid
EXIT_BUDGET = 5  # the spend cap is reached; rows not sent are left for the next run (wins over 1)
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM

EXIT_MEANINGS = {  # for --help, the README's table and the report
    EXIT_OK: "every row ok or filtered",
    EXIT_ROW_ERRORS: "some rows ended in error",
    EXIT_USAGE: "bad usage or config",
    EXIT_REFUSED: "the endpoint refused us (key, deployment, route, quota gone)",
    EXIT_OUTPUT_FAILED: "the output could not be written",
    EXIT_BUDGET: "the spend cap was reached; a rerun goes on with the rows left",
    EXIT_INTERRUPTED: "interrupted",
}
