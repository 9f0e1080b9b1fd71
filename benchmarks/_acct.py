import sys
import bench_scheduler as b
from jobs.driver import job_units
from jobs.executor import ActorRequests
from jobs.plan import Plan
from jobs.scheduler import NodeResources, Scheduler
from jobs.simulation import SimulatedBackend
from jobs.spec import *
case = sys.argv[1]
sizes, pairs, sets = b.workload(case)
spec = JobSpec(name='sim', pairs=(), dtype='bfloat16', compute=Compute(gpu_memory_gb=80), generation=Generation(enabled=True), analyses=Analyses(enabled=True))
plan = Plan(spec, tuple(sets), tuple(pairs))
costs = b.Costs(sizes, False)
units, _ = job_units(spec, pairs, b._NothingStored(), log=lambda m: None)
backend = SimulatedBackend([NodeResources('node0', 1000.0, 8)], costs.load_s, costs.work_s)
req = ActorRequests(plan)
sch = Scheduler(units, req, backend)
sch.run()
T = backend.now
held = backend.held_gpu_seconds()
load = sum((a.ready - a.created) * a.slot.request.gpus for a in backend.actors)
print(f"T={T:.0f}s GPU-s available {8*T:.0f}, held {held:.0f}, loading {load:.0f}, primary compute {backend.work_gpu_seconds:.0f}, idle+secondary {held-load-backend.work_gpu_seconds:.0f}")
from collections import defaultdict
by = defaultdict(float)
for u in units:
    by[u.kind] += costs.cost(u)
print({k: round(v) for k, v in by.items()})
