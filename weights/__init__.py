"""Models bundled with jpatch. pyproject.toml installs this folder as the package `jpatch.weights`,
so an installed jpatch finds them (`jpatch.model.checkpoint.bundled_weights`)."""
