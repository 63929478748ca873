"""The pure core of modelpool.

Rule: nothing in this package does I/O, reads a clock, starts a thread or imports Flask,
sockets or the rest of the project. Time is passed in as a float (seconds since the epoch);
decisions are returned as data. ``tests/test_core_purity.py`` enforces the rule.
"""
