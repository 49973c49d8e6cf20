"""Training-step time against the torch thread count, alone and next to a busy process.

The tiny U-Net (``unet_tiny``, batch 2 of 2 x 32^3, Adam, cross-entropy: the step of
``bench_step.py``'s raw loop) is timed with three thread settings:

- **default**: what torch picks by itself (one thread per CPU of the machine);
- **configured**: ``sap_lightning.core.threads.configure_threads()``, what the ``sap`` command
  line sets (the CPUs the process may use: affinity mask and cgroup quota, less the CPUs other
  processes keep busy when it starts);
- **one**: a single thread;
- **passive**: configured, with ``OMP_WAIT_POLICY=PASSIVE`` in the environment (OpenMP threads
  sleep instead of spinning while they wait; it must be set before torch is imported).

Each runs alone and then next to a competing process spinning numpy on one core (a shared
machine, another job on the node). Then, for ``sap study``'s ``workers: 2`` (the demo's), two
**half** processes (half the usable CPUs as threads each, ``threads_per_worker``) run side by
side with nothing else: ``workers ratio: R.RRx`` is their steps per second together over one
configured process's alone (target >= 1.10x: two workers finish a study's independent runs
sooner than one process running them in turn). Every setting is its own process, without
``OMP_NUM_THREADS``/``SAP_NUM_THREADS`` in its environment; the median step counts. Where the
process may use every CPU of the machine, default and configured coincide; in a container or a
cluster job with fewer CPUs than the machine, default oversubscribes them. The last line is
``threads ratio: R.RRx`` (configured over the faster of default and one thread, next to the busy
process; target <= 1.10x: the configured count is never the bad choice).

    python benchmarks/bench_threads.py [--steps 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = ("default", "configured", "one", "passive")
BUSY = (
    "import numpy as np\n"
    "x = np.random.default_rng(0).random((192, 192))\n"
    "while True:\n"
    "    x = x @ x\n"
    "    x /= np.abs(x).max()\n"
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "SAP_NUM_THREADS")


def _worker(setting: str, steps: int, warmup: int) -> dict:
    from sap_lightning.backbones import create_backbone
    from sap_lightning.core.threads import configure_threads

    if setting in ("configured", "passive"):
        configure_threads()
    elif setting == "one":
        torch.set_num_threads(1)
    elif setting == "half":
        from sap_lightning.core.threads import usable_cpus
        from sap_lightning.pipeline.steps import threads_per_worker

        torch.set_num_threads(threads_per_worker(2, usable_cpus()))
    torch.manual_seed(0)
    net = create_backbone("unet_tiny", 2, 2)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    image = torch.rand(2, 2, 32, 32, 32)
    label = torch.randint(0, 2, (2, 32, 32, 32))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(image), label)
        loss.backward()
        optimiser.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "ms": 1000 * statistics.median(times)}


def _clean_env(one_thread: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if one_thread:
        env.update({name: "1" for name in THREAD_VARIABLES})
    return env


def _start(setting: str, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", setting]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = _clean_env()
    env.pop("OMP_WAIT_POLICY", None)
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def _result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return json.loads(out.strip().splitlines()[-1])


def _run(setting: str, args: argparse.Namespace) -> dict:
    return _result(_start(setting, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", choices=(*SETTINGS, "half"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.warmup)))
        return
    from sap_lightning.core.threads import usable_cpus

    alone = {setting: _run(setting, args) for setting in SETTINGS}
    busy_process = subprocess.Popen(
        [sys.executable, "-c", BUSY], env=_clean_env(one_thread=True), stdout=subprocess.DEVNULL
    )
    try:
        time.sleep(1.0)  # the competitor is spinning before the first step
        busy = {setting: _run(setting, args) for setting in SETTINGS}
    finally:
        busy_process.kill()
        busy_process.wait()
    print(
        f"unet_tiny, batch 2 x 2 x 32^3, median of {args.steps} steps; machine CPUs "
        f"{os.cpu_count()}, usable CPUs {usable_cpus()}; busy = one numpy process spinning"
    )
    print(
        f"{'setting':>12}{'threads alone/busy':>20}{'alone ms':>10}{'busy ms':>10}{'busy/alone':>12}"
    )
    for setting in SETTINGS:
        a, b = alone[setting], busy[setting]
        threads = f"{a['threads']}/{b['threads']}"
        print(f"{setting:>12}{threads:>20}{a['ms']:10.1f}{b['ms']:10.1f}{b['ms'] / a['ms']:11.2f}x")
    default_ms, one_ms = busy["default"]["ms"], busy["one"]["ms"]
    print(f"default over configured (busy): {default_ms / busy['configured']['ms']:.2f}x")
    print(f"threads ratio: {busy['configured']['ms'] / min(default_ms, one_ms):.2f}x")
    pair = [_start("half", args) for _ in range(2)]  # side by side, as two study workers
    halves = [_result(process) for process in pair]
    together = sum(1000 / half["ms"] for half in halves)  # steps per second of both
    alone_rate = 1000 / alone["configured"]["ms"]
    print(
        f"two workers of {halves[0]['threads']} threads side by side: "
        + " / ".join(f"{half['ms']:.1f}" for half in halves)
        + f" ms per step ({together:.2f} steps/s) against one configured process alone: "
        f"{alone['configured']['ms']:.1f} ms ({alone_rate:.2f} steps/s)"
    )
    print(f"workers ratio: {together / alone_rate:.2f}x")


if __name__ == "__main__":
    main()
