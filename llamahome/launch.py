"""The one entry point: `python -m llamahome.launch --gin_file=... --gin_param=...`.

The job itself is bound in gin (`launch.job = @train`); see `llamahome/cli.py` for the flags,
the order in which settings are bound, and the run dir.
"""

if __name__ == "__main__":
    from llamahome.cli import run

    run()
