"""One rank of the distributed test: started by `mlx.launch` from tests/test_distributed.py.

    python tests/dist_worker.py PLAN.json OUT_DIR

PLAN.json names (target, drafter) folders; each is loaded sharded over the launched group, every
case of tests/dist_cases.py runs, and this rank writes what it got to OUT_DIR/rank<r>.json. Its
"memory" pair (arrays large enough that MLX's small-buffer pool does not blur the count) is only
loaded: this rank's footprint, and from a whole copy loaded afterwards, which weights are replicated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_specdec.loading import load
from tests.dist_cases import run_plan


def _shapes(spec) -> dict[str, tuple]:
    out = {}
    for name, model in (("target", spec.target), ("drafter", spec.drafter)):
        out.update({f"{name}.{k}": (tuple(v.shape), v.nbytes) for k, v in tree_flatten(model.parameters())})
    return out


def main(plan_file: str, out_dir: str) -> None:
    group = mx.distributed.init()
    plan = json.loads(Path(plan_file).read_text())
    results = {"rank": group.rank(), "size": group.size(), "pairs": {}}
    pair = plan["memory"]
    spec = load(pair["target"], drafter=pair["drafter"], group=group, policy_cache=False)
    footprint, sharded = spec.footprint, _shapes(spec)
    del spec
    whole = _shapes(load(pair["target"], drafter=pair["drafter"], policy_cache=False))
    results["memory"] = footprint.as_dict() | {
        "replicated_bytes": sum(nbytes for key, (shape, nbytes) in whole.items() if sharded[key][0] == shape),
        "split_bytes": sum(nbytes for key, (shape, nbytes) in whole.items() if sharded[key][0] != shape),
    }
    for pair in plan["pairs"]:
        spec = load(pair["target"], drafter=pair["drafter"], group=group, policy_cache=False)
        results["pairs"][pair["name"]] = run_plan(spec, light=pair.get("light", False))
    Path(out_dir, f"rank{group.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
