"""Profile the gateway under one benchmark phase with py-spy (not part of ``make bench``).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py --phase throughput [--quick] [--top 30]

Starts the simulator and a gateway exactly as ``run.py`` does, attaches ``py-spy record``
to the gateway for the phase (gateway side only, no direct run), writes the collapsed
stacks to ``bench/results/profile-<phase>.txt`` (feed it to flamegraph.pl or speedscope)
and prints the functions with the most samples, by own time and including callees.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run


def top(path: Path, n: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f.rsplit(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].split(":")[0]
                  for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    out += ["", "including callees:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(n)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=run.PHASES, default="throughput")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--history", choices=("off", "sqlite"), default="off",
                        help="the gateway's history store (requests phase: sqlite)")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(run.BIN)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    cpus = sorted(run.os.sched_getaffinity(0))
    gw_cpus, load_cpus = run.cores(cpus)
    sizes = run.QUICK if args.quick else run.FULL
    out = run.HERE / "results" / f"profile-{args.phase}-{args.history}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tokenrelay-profile-")
    database = "none" if args.history == "off" else f"sqlite:///{tmp}/history.db"
    with run.simulator(load_cpus) as (sim_url, sim), \
            run.gateway(sim_url, gw_cpus, 5.0, database_url=database) as (gw_url, gw):
        spec = {**sizes[args.phase], "phase": args.phase, "model": "sim-fast",
                "heartbeat_s": 5.0, "targets": {"gateway": gw_url},
                "pids": {"gateway": gw.pid, "upstream": sim.pid}}
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--format", "raw",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            result = run.loadgen(spec, load_cpus, timeout=600)
        finally:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
    print(json.dumps(result["gateway"], indent=1))
    print(top(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
