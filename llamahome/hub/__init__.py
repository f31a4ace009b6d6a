"""Model management: downloads (download.py), the version registry (registry.py), the disk
budget (storage.py), and guards for untrusted paths, pickles, secrets and memory (security.py).
The jobs `download_model` and `models` are in jobs.py."""
