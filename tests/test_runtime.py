import subprocess
import sys
import textwrap


def test_exit_freeze_runs_after_the_other_exit_handlers(repo):
    """skip_exit_collection's gc.freeze is the last exit handler: Prefect's log flush and the temporary
    server's stop (registered later) still run, and see a collector that is not frozen yet."""
    script = textwrap.dedent("""
        import atexit, gc
        from dpoflow.base.runtime import skip_exit_collection
        skip_exit_collection()
        skip_exit_collection()  # once per process
        atexit.register(lambda: print("later handler, frozen:", gc.get_freeze_count() > 0))
        atexit.register(lambda: print("handlers registered:", atexit._ncallbacks()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["handlers registered: 3", "later handler, frozen: False"]
