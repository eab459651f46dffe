"""Profile of one learner update on the demo config's batch (torch.profiler, top ops by self CPU time).

    python -m bench.learner_profile [--out bench/results/learner_profile_after.txt] [--rows 30] [--ahead]

The batch is ``bench.learner_update.demo_groups``: 2 chat prompts x 4 completions of up to 48 tokens
(configs/demo.yaml: SmolLM2-135M-Instruct float32, LoRA r=16 on q,v,o,down, micro-batch 4, one
thread). One warm-up update runs first (allocator, lazy imports); the next update is profiled.
``--ahead``: pi_ref's pass is done before the profiled update (``Learner.prepare_reference``, as the
driver does while the rewards are computed), so the profile shows what is left on the step's path.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from bench.common import ROOT, load_average, machine_info

log = logging.getLogger(__name__)


def profile_update(out: Path, rows: int, learner_cls: type | None = None, ahead: bool = False) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.learner_update import demo_groups, make_learner

    learner = make_learner(learner_cls)
    learner.update(demo_groups(learner, version=learner.version))  # warm-up
    groups = demo_groups(learner, version=learner.version)
    if ahead:
        learner.prepare_reference(1, [[(s.prompt_ids, s.completion_ids) for s in g.samples] for g in groups])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        stats = learner.update(groups, 1) if ahead else learner.update(groups)
        wall = time.perf_counter() - t0
    if ahead:
        assert stats["reference_ahead_fraction"] == 1.0
    header = (f"# one learner update, demo config batch (2 prompts x 4 completions x <=48 tokens), "
              f"{torch.get_num_threads()} thread(s); class {type(learner).__module__}.{type(learner).__name__}"
              f"{'; pi_ref prepared ahead (prepare_reference), not in the profile' if ahead else ''}\n"
              f"# update wall {wall:.3f} s under the profiler; load average {load_average()}; "
              f"cpu {machine_info().get('cpu_model')}\n")
    text = header + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learner_profile.txt")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--reference", action="store_true", help="profile bench.learner_update.ReferenceLearner")
    parser.add_argument("--ahead", action="store_true", help="pi_ref's pass done before the profiled update")
    args = parser.parse_args(argv)
    cls = None
    if args.reference:
        from bench.learner_update import ReferenceLearner

        cls = ReferenceLearner
    print(profile_update(args.out, args.rows, cls, args.ahead), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
