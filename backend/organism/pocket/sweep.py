"""Experiment driver: several builds with overrides, each measured (used on a GPU to pick
hyper-parameters quickly; the shipped build is the plain CPU `organism pocket-build`).

    ORGANISM_DEVICE=cuda python -m backend.organism.pocket.sweep OUT_ROOT '{"label": {overrides}}' [--only base]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from backend.organism.pocket.build import build_organism
from backend.organism.pocket.measure import acceptance, em_eval, load, measure, summarize
from backend.organism.pocket import corpus as C


def main() -> None:
    root, grid = Path(sys.argv[1]), json.loads(sys.argv[2])
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    results = {}
    for label, overrides in grid.items():
        t0 = time.time()
        out = root / label
        man = build_organism(out, "full", 0, measure=False, overrides=overrides,
                             only=[o for o in only if o != "base"] if only else None, log=lambda *a: None)
        if only == ["base"]:
            model, tok = load(out)
            r = em_eval(model, tok, C.eval_questions(4), 8, examples=6)
            res = {"base": summarize(r["per_domain"], None), "examples": r["examples"]}
        else:
            res = measure(out, log=lambda *a: None)
            res["acceptance"] = acceptance(res)
        res["losses_tail"] = {"base": man["base"]["losses"][-1],
                              **{k: v["losses"][-1] for k, v in man["adapters"].items()}}
        res["build_s"] = man["build_s"]
        results[label] = res
        brief = {k: ({kk: vv for kk, vv in v.items() if kk not in ("per_domain", "examples")}
                     if isinstance(v, dict) else v) for k, v in res.items() if k != "examples"}
        for k in ("medical", "finance", "sports"):
            if k in brief:
                brief[k]["ablated"] = {kk: vv for kk, vv in res[k]["ablated"].items() if kk != "per_domain"}
        brief.pop("steering", None)
        if "steering" in res:
            brief["steering"] = {c: (s["em_all"], s["coherent_all"]) for c, s in res["steering"].items()}
        print(label, f"{time.time() - t0:.0f}s", json.dumps(brief), flush=True)
        for e in res.get("examples", [])[:3]:
            print("   ", e, flush=True)
    (root / "sweep.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
