"""``python -m fcgispawn`` is the same program as the ``fcgispawn`` script."""

from fcgispawn.cli import main

if __name__ == "__main__":
    main()
