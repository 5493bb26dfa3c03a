"""The spool's files: folder layout and atomic writes, input documents, results and
failures."""
