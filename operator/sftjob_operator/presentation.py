"""Pure presentation shared by `sftjob plan` and `sftjob run`: a job's plan as data and as text.

Both the command line and the trainer's local runner import it; neither imports the other.
"""

from __future__ import annotations

import json
from typing import Any

from .advice import advise
from .api import SFTJob
from .plan import PreparedRows, plan_for
from .policy import Resolution


def plan_report(
    job: SFTJob, dataset_size: int | None, prepared: PreparedRows | None = None
) -> dict[str, Any]:
    """The plan and advice of one job, as `sftjob plan -o json` prints it.

    `prepared`: the rows a tokenizer pass found (sftjob_operator.tokenized_plan).
    """
    plan = plan_for(job.spec, dataset_size, prepared)
    advisories = advise(job.spec, plan)
    return {
        "name": job.metadata.name,
        "namespace": job.metadata.namespace,
        **plan.model_dump(mode="json"),
        "learningRate": job.spec.learning_rate,
        "advisories": [a.model_dump(mode="json", exclude_none=True) for a in advisories],
    }


def policy_report(resolution: Resolution) -> dict[str, Any]:
    """A job's verdict under its profile, as `sftjob plan -o json` prints it under `policy`."""
    effective = resolution.effective_status() or {}
    return {
        "profile": effective.get("profile"),
        "fromProfile": [{"field": path, "value": value} for path, value in resolution.from_profile],
        "violations": [violation.to_json() for violation in resolution.violations],
    }


def format_plan(report: dict[str, Any]) -> str:
    """A `plan_report` as the table `sftjob plan` prints."""

    def show(value: Any) -> str:
        return "pending (set dataset.limit or numSamples)" if value is None else str(value)

    label = f"SFTJob {report['namespace'] or 'default'}/{report['name'] or '?'}"
    if report["estimate"]:
        label += "  [estimate]"
    world = report["worldSize"]
    lines = [
        label,
        f"  dataset size      {show(report['datasetSize'])} ({report['datasetSizeSource']})",
        f"  world size        {world} process{'es' if world != 1 else ''}",
        f"  effective batch   {report['effectiveBatchSize']} = "
        f"{report['perDeviceTrainBatchSize']} per device x "
        f"{report['gradientAccumulationSteps']} accumulation x {world}",
        f"  steps per epoch   {show(report['stepsPerEpoch'])}",
        f"  total steps       {show(report['totalSteps'])}"
        + (f" ({report['epochs']:g} epochs)" if report["epochs"] is not None else ""),
        f"  warmup steps      {show(report['warmupSteps'])}",
        f"  learning rate     {report['learningRate']:g}",
    ]
    lines += [f"  note: {note}" for note in report["notes"]]
    if report["advisories"]:
        lines.append("  advisories:")
        for advisory in report["advisories"]:
            suggested = advisory.get("suggested")
            lines.append(
                f"    [{advisory['severity']}] {advisory['code']} ({advisory['field']}): "
                f"{advisory['message']}" + (f" -> suggested: {suggested}" if suggested else "")
            )
    else:
        lines.append("  advisories: none")
    if "policy" in report:
        lines += _policy_lines(report["policy"])
    return "\n".join(lines)


def _policy_lines(policy: dict[str, Any]) -> list[str]:
    lines = [f"  profile           {policy['profile'] or 'none'}"]
    if policy["fromProfile"]:
        lines.append("  from the profile:")
        lines += [
            f"    {item['field']} = {json.dumps(item['value'], sort_keys=True)}"
            for item in policy["fromProfile"]
        ]
    violations = policy["violations"]
    if not violations:
        lines.append("  policy: allowed")
        return lines
    lines.append(
        f"  policy: REFUSED, {len(violations)} violation{'s' if len(violations) > 1 else ''}"
    )
    lines += [f"    {v['field']}: {v['message']} (rule {v['rule']})" for v in violations]
    return lines
