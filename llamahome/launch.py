"""The one entry point: `python -m llamahome.launch --gin_file=... --gin_param=...`.

The job itself is bound in gin (`launch.job = @train`); see `llamahome/cli.py` for the flags,
the order in which settings are bound, and the run dir. Before anything else the process
re-executes itself under mimalloc (installed by pip), tcmalloc or jemalloc (llamahome/allocator.py).
"""

if __name__ == "__main__":
    import sys

    from llamahome import allocator
    from llamahome.errors import UserError

    try:
        allocator.reexec()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    from llamahome.cli import run

    run()
