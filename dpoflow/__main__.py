import sys

try:
    from .app.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command has even started: no traceback either
    print("\ndpoflow: interrupted while starting; run the command again", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
