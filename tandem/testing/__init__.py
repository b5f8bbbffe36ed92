"""Builders shared by the tests and the benchmarks: tiny data and models, real server processes.

Plain functions and classes, no pytest: ``tests/fixtures/`` wraps them in fixtures, and the
benchmarks call them directly. Stage packages are imported inside the builders that need them,
so importing ``tandem.testing`` stays as light as the rest of ``tandem``.
"""
