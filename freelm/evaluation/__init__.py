"""Evaluation: runner output -> graded answers -> pass@k metrics, tables, plots, efficiency, LLM judge.

Modules are small and import their heavy dependencies (math-verify, matplotlib,
openai) lazily, so ``import freelm.evaluation`` stays cheap.
"""
