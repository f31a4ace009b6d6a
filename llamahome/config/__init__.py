"""Turning gin files, the environment, a TOML file and --gin_param flags into gin bindings."""
