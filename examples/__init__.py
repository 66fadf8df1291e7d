"""Runnable privsep example programs: ``python3 -m examples.thumbnailer``, ``python3 -m examples.unpack``."""
