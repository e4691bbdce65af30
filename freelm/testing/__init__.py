"""Servers for tests and benchmarks: real HTTP on 127.0.0.1, backed by the local engine or a scripted one."""
