"""``python -m rescan`` runs the command-line interface."""

from rescan.cli import main

main()
