"""rescan: re-scan mail already stored in mailboxes against updated malware definitions."""

__version__ = "0.1.0"
