"""``python -m jaxembed`` is the ``jaxembed`` command."""

from jaxembed.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
