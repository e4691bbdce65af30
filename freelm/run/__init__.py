"""The batch runner (``runner.py`` / ``freelm run``), one module per concern.

``flags`` (the command line and its checks) -> ``spec`` (:class:`~freelm.run.spec.RunSpec`, the
typed run made once from the flags) -> ``settings`` (the results-deciding part
and its hash) -> ``components`` (backends, pools, cleaner; what the servers
report) -> ``plan`` (what the output holds, resume, the jobs left) -> ``batch``
(running them, writing each finished rollout) -> ``cli`` (the order of a start,
exit codes). docs/runner.md is the user's guide.
"""
