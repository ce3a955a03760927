"""Runs that outlive a process: result folders (results) and resumable bulk sweeps (bulk)."""
