import sys
import bench_scheduler as b
from jobs.driver import job_units
from jobs.plan import Plan, PairPlan, ActivationSet
from jobs.scheduler import NodeResources, Scheduler, Request
from jobs.simulation import SimulatedBackend
from jobs.spec import *
import random
n, slots = int(sys.argv[1]), int(sys.argv[2])
base = ModelSource("sim/base")
sets = {}
aset = lambda s: sets.setdefault(s, ActivationSet(f"activations/{s.model}", s, (1,), {}, None, s.model, 1000))
pairs = [PairPlan(Pair(f"p{j}", base, ModelSource(f"sim/ft{j}")), (1,), aset(base), aset(ModelSource(f"sim/ft{j}")), f"pairs/{j}") for j in range(n)]
spec = JobSpec(name='sim', pairs=(), dtype='float32', generation=Generation(enabled=True), analyses=Analyses(enabled=True))
units, _ = job_units(spec, pairs, b._NothingStored(), log=lambda m: None)
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
backend = SimulatedBackend([NodeResources('n', slots * 0.5, 0)], lambda k: rng.uniform(3, 10), lambda u, a: rng.uniform(1, 10))
sch = Scheduler(units, lambda k: Request(0.5, 0), backend)
sch.run()
print("loads", sum(sch.loads.values()), "distinct", len(sch.loads), "reloads", [(str(k), w) for k, w in sch.reloads])
