"""Host <-> GPU copy bandwidth with pinned memory, the budget of train.offload_activations/offload_mlp_layers.

    python bench/pcie_bandwidth.py [--mib 512] [--out FILE.json]

Times a pinned host buffer copied to the GPU (H2D), back (D2H), and both at once on two streams, each the
median of 5 after one warm-up; prints and writes GB/s (10^9 bytes per second).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    n = a.mib * 2**20
    host_a = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(n, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        with torch.cuda.stream(s1):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(dev_b, non_blocking=True)

    h2d = _timed(lambda: dev_a.copy_(host_a, non_blocking=True))
    d2h = _timed(lambda: host_b.copy_(dev_b, non_blocking=True))
    bi = _timed(both)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "mib": a.mib,
           "h2d_gb_s": round(n / h2d / 1e9, 1), "d2h_gb_s": round(n / d2h / 1e9, 1),
           "both_directions_gb_s_each": round(n / bi / 1e9, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
