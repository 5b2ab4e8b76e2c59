"""Fetching the offline demo assets (see assets.py); `python -m sparsezip_demo --help`."""
