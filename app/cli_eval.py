"""``python -m app.cli_eval``: the ``mome-eval`` command (:mod:`app.cli.eval`; the API is :mod:`app.evaluation`)."""

if __name__ == "__main__":
    import sys

    from app.cli.eval import main

    sys.exit(main())
