"""The SQL front: validation, parameters and rewrites (sqlglot), execution on DataFusion."""
