"""The Batch API transport: rows packed into JSONL files, submitted as jobs, collected when they end.

``run.run_batch`` is the entry (``runner.run`` calls it when ``endpoint.mode = "batch"``) and
``engine.BatchEngine`` the work; ``planner`` and ``lines`` build and pack the files, ``ledger`` records every step in the output folder, ``api`` speaks the Files and
Batches APIs, ``collect`` turns output and error files into results.
"""
