"""Files jpatch writes: output markers, locks and the refusals that protect users' files
(safety), and atomic writes (atomic). The lowest layer: imports nothing else from jpatch."""
