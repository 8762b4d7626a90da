"""Files diffgen writes and reads: traces and batch jobs."""
