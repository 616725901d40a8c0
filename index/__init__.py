"""Collection storage: dynamically typed Arrow segments, deletion masks, the tantivy index,
and the manifest that persists them with the ingest checkpoint."""
