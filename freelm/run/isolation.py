"""The adapter isolation check of a run: before the first rollout, on every server that answers both modes.

A server that gets reasoning calls (base model) and cleaning calls (the
Free-Module) is probed with :func:`freelm.backends.isolation.probe_isolation`
on the run's own first prompts. A leak refuses the start (exit 2) with the
hazard and its fix; an inconclusive probe is a warning, and so is a probe
request that fails (whether a name is served is the startup check's question,
whether cleaning calls fail during the run the cleaning verdict's). Servers that get only
one of the two (a separate ``--cleaner-endpoint``) cannot mix them and are not
probed; nor is the in-process engine (its mixed batches are tested in
``tests/backends/test_backend_local_batch.py``). ``--skip-isolation-check`` skips it for
engines where the probe is impossible.
"""

from __future__ import annotations

import sys
from typing import Any

from freelm.backends.base import Backend, BackendError
from freelm.backends.isolation import PROBE_PROMPTS, PROBE_TOKENS, probe_isolation
from freelm.data import Problem
from freelm.prompts import render_reasoning_prompt
from freelm.run.components import Components
from freelm.run.spec import RunSpec

#: what is known to cause a leak, and what fixes it (the probe sees only that outputs changed)
KNOWN_CAUSES = (
    "Known causes: vLLM on CPU, whose torch LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py) read the no-adapter "
    "index -1 as the last adapter slot: serve with --max-loras = adapters + 1 (scripts/serve_vllm.sh does; "
    "upstream vLLM PR #48421); SGLang's cross-adapter radix-cache reuse report (sgl-project/sglang#24638)."
)


def shared_servers(spec: RunSpec, components: Components) -> list[tuple[Backend, str]]:
    """The (client, adapter) of every remote server that answers both the reasoner and the cleaner's adapter."""
    adapter, cleaning, reasoner = spec.cleaner_adapter, components.cleaner_pool, components.reasoner
    if adapter is None or cleaning is None or not reasoner.remote:
        return []
    if cleaning is reasoner:
        return [(e.backend, adapter) for e in reasoner.endpoints if e.up]
    reasoning_urls = {getattr(e.backend, "base_url", None) for e in reasoner.endpoints}
    return [
        (e.backend, adapter)
        for e in cleaning.endpoints
        if e.up and getattr(e.backend, "base_url", None) in reasoning_urls
    ]


def probe_prompts(spec: RunSpec, problems: list[Problem], tokenizer: Any) -> list[list[int]]:
    """The reasoning prompts of the run's first problems, as the loop sends them, that leave room to answer."""
    prompts = []
    for problem in problems:
        ids = tokenizer.encode(render_reasoning_prompt(problem.prompt, tokenizer, spec.loop.problem_suffix))
        if len(ids) + PROBE_TOKENS < spec.loop.context_limit - 1:
            prompts.append(ids)
        if len(prompts) == PROBE_PROMPTS:
            break
    return prompts


async def check_isolation(spec: RunSpec, components: Components, problems: list[Problem]) -> dict[str, Any]:
    """Probe every shared server; the reports by endpoint, for the manifest. Raises ValueError on a leak."""
    servers = shared_servers(spec, components) if spec.isolation_check else []
    prompts = probe_prompts(spec, problems, components.tokenizer) if servers else []
    reports: dict[str, Any] = {}
    for backend, adapter in servers:
        if not prompts:
            print("warning: adapter isolation not checked: no problem prompt fits the window", file=sys.stderr)
            break
        try:
            report = await probe_isolation(backend, adapter, prompts, endpoint=backend.name)
        except BackendError as exc:  # availability is the startup check's and the cleaning verdict's to judge
            print(
                f"warning: {backend.name}: adapter isolation not checked: a probe request failed ({exc})",
                file=sys.stderr,
            )
            reports[backend.name] = {
                "endpoint": backend.name,
                "adapter": adapter,
                "verdict": "unchecked",
                "error": str(exc),
            }
            continue
        reports[backend.name] = report.to_dict()
        if report.verdict == "leak":
            raise ValueError(
                f"{backend.name}: adapter isolation check failed: {report.describe()}. This server applies the "
                f"cleaner's adapter to base-model (reasoning) requests batched with adapter requests: reasoning would "
                f"silently run with the Free-Module's delta. {KNOWN_CAUSES} (--skip-isolation-check skips the check.)"
            )
        if report.verdict == "inconclusive":
            print(f"warning: {backend.name}: adapter isolation not established: {report.describe()}", file=sys.stderr)
    return reports
