"""Shared machinery of ``benchmarks/run.py`` and ``benchmarks/scaling.py``.

* Models and data (deterministic from a seed): an MLP on scikit-learn digits, a CNN on 28x28
  inputs (upsampled, shifted and noised digits), a ~5M-parameter wide CNN on the same inputs, and a
  width / classes parametrised MLP for the scaling study.
* A short MAP training run per model, cached on disk so every worker starts from the same weights.
* Worker processes: every measured item runs in a fresh ``python <script> --worker <task-json>``
  process. The worker builds model and data, runs the item's setup, then records its resident
  set size (``VmRSS``), resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``),
  runs a warm-up and the timed repeats, and reports ``VmHWM - baseline`` as the peak extra memory.
  An optional address-space cap (``RLIMIT_AS``) turns runaway allocations into a clean
  ``oom`` result, and the parent kills a worker that exceeds its timeout.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

RESULT_TAG = "@@RESULT "
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# process memory
# --------------------------------------------------------------------------------------------


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``, ``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (``/proc/stat``: user, nice, system, irq,
    softirq, steal), in seconds summed over cores."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


class ForeignLoad:
    """Average number of cores kept busy by *other* processes between start() and stop()."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        self.t, self.busy, self.own = time.time(), cpu_busy_seconds(), own_cpu_seconds()

    def stop(self) -> float:
        dt = max(1e-9, time.time() - self.t)
        foreign = (cpu_busy_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, foreign / dt)


# --------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------


def build_model(name: str, width: int = 128, classes: int = 10, d_in: int = 64):
    from torch import nn

    if name == "mlp":  # digits: 64 -> 128 -> 128 -> 10
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    if name == "cnn":  # the CNN: Conv 1->16->32, Linear 800->256->10
        return nn.Sequential(
            nn.Conv2d(1, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 26 -> 13
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 13 -> 11 -> 5
            nn.Flatten(),
            nn.Linear(800, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    if name == "wide":  # ~4.9M parameters: Conv 1->32->64, Linear 1600->2048->768->10
        return nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1600, 2048),
            nn.ReLU(),
            nn.Linear(2048, 768),
            nn.ReLU(),
            nn.Linear(768, 10),
        )
    if name == "smlp":  # scaling study: d_in -> width -> width -> classes
        return nn.Sequential(
            nn.Linear(d_in, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )
    raise ValueError(f"unknown model {name!r}")


MODEL_INFO = {
    "mlp": "MLP 64-128-128-10 (ReLU) on scikit-learn digits (8x8)",
    "cnn": "CNN Conv(1,16,3)-pool-Conv(16,32,3)-pool-Linear(800,256)-Linear(256,10) on 1x28x28",
    "wide": "wide CNN Conv(1,32,3)-pool-Conv(32,64,3)-pool-Linear(1600,2048)-Linear(2048,768)"
    "-Linear(768,10) on 1x28x28",
}


def _digits():
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def _upsampled_digits(n: int, seed: int):
    """``n`` inputs ``[n, 1, 28, 28]``: digits upsampled to 24x24, placed at a random offset in
    a 28x28 canvas, plus a little Gaussian noise (cycled through the 1,797 digits)."""
    import torch
    import torch.nn.functional as F

    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % x.shape[0]
    img = F.interpolate(x[idx].reshape(-1, 1, 8, 8), size=(24, 24), mode="bilinear")
    out = torch.zeros(n, 1, 28, 28)
    off = torch.randint(0, 5, (n, 2), generator=g)
    for i in range(n):
        r, c = int(off[i, 0]), int(off[i, 1])
        out[i, :, r : r + 24, c : c + 24] = img[i]
    out += 0.05 * torch.randn(out.shape, generator=g)
    return out, y[idx]


def build_data(model: str, n: int, n_test: int = 1024, seed: int = 0, **kw):
    """``(x_train, y_train, x_test, y_test)`` for a model; deterministic in ``seed``."""
    import torch

    if model == "mlp":
        x, y = _digits()
        n = min(n, x.shape[0])
        # test inputs: the digits again (cycled), with a little noise: only timing matters here
        g = torch.Generator().manual_seed(seed + 1)
        ti = torch.arange(n_test) % x.shape[0]
        xt = x[ti] + 0.05 * torch.randn(n_test, 64, generator=g)
        return x[:n], y[:n], xt, y[ti]
    if model in ("cnn", "wide"):
        x, y = _upsampled_digits(n, seed)
        xt, yt = _upsampled_digits(n_test, seed + 1000)
        return x, y, xt, yt
    if model == "smlp":  # synthetic Gaussian-mixture classification
        d_in, classes = kw.get("d_in", 64), kw.get("classes", 10)
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, d_in, generator=g)
        y = torch.randint(0, classes, (n + n_test,), generator=g)
        x = centers[y] + torch.randn(n + n_test, d_in, generator=g)
        return x[:n], y[:n], x[n:], y[n:]
    raise ValueError(f"unknown model {model!r}")


def make_loader(x, y, batch_size: int):
    import torch

    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def train(model, loader, epochs: int, lr: float = 1e-3, seed: int = 0) -> float:
    """A short MAP fit (Adam on the mean cross-entropy, weight decay 1e-4); returns the
    final training accuracy."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / max(1, total)


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Problem:
    """A model at its (cached) MAP weights, its training loader and test inputs."""

    name: str
    model: object
    loader: object
    x: object
    y: object
    x_test: object
    n_params: int
    batch_size: int

    @property
    def n_data(self) -> int:
        return int(self.x.shape[0])


def build_problem(spec: dict, cache_dir: str, seed: int = 0) -> Problem:
    """``spec``: ``{"model", "n", "batch_size", "epochs", ...}``; trains once (the weights are
    cached under ``cache_dir`` by spec) and reuses the weights afterwards."""
    import torch

    torch.manual_seed(seed)
    kw = {k: spec[k] for k in ("width", "classes", "d_in") if k in spec}
    model = build_model(spec["model"], **kw)
    x, y, xt, _ = build_data(spec["model"], spec["n"], spec.get("n_test", 1024), seed, **kw)
    loader = make_loader(x, y, spec["batch_size"])
    path = os.path.join(cache_dir, f"{spec['model']}-{spec_key(spec)}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        os.makedirs(cache_dir, exist_ok=True)
        train(model, loader, spec.get("epochs", 1), seed=seed)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    return Problem(spec["model"], model, loader, x, y, xt, n_params, spec["batch_size"])


# --------------------------------------------------------------------------------------------
# timing inside a worker
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What one worker reports for its item."""

    times: list[float] = field(default_factory=list)  # total seconds per timed repeat
    phases: dict[str, list[float]] = field(default_factory=dict)  # optional split per repeat
    warmup_s: float | None = None
    baseline_mb: float | None = None
    peak_extra_mb: float | None = None
    info: dict = field(default_factory=dict)


def measure(
    fn: Callable[[], dict | None],
    warmup: Callable[[], object] | None,
    repeats: int,
    budget_s: float,
) -> Measured:
    """Warm up, then time ``fn`` ``repeats`` times (fewer if the repeats exceed ``budget_s``;
    at least one). ``fn`` may return ``{phase: seconds}``; its total wall time is always taken.
    The peak RSS over warm-up and repeats is measured against the RSS before the warm-up."""
    m = Measured()
    gc.collect()
    base = proc_status("VmRSS")
    m.baseline_mb = base / MB
    m.info["hwm_reset"] = reset_peak()
    if warmup is not None:
        t = time.perf_counter()
        warmup()
        m.warmup_s = time.perf_counter() - t
        gc.collect()
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        m.times.append(time.perf_counter() - t)
        for k, v in (out or {}).items():
            m.phases.setdefault(k, []).append(v)
        del out
        gc.collect()
        if time.perf_counter() - start > budget_s:
            break
    m.peak_extra_mb = max(0.0, (proc_status("VmHWM") - base) / MB)
    return m


def cap_address_space(cap_gb: float | None) -> None:
    """Limit further allocations to ``cap_gb`` GB beyond the current address space."""
    if not cap_gb:
        return
    extra = int(cap_gb * 1024**3)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = proc_status("VmSize") + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory")
    )


def worker_main(task_json: str, registry: dict[str, Callable[[dict], Measured]]) -> None:
    """Entry point of ``--worker``: run one task and print one tagged JSON result line."""
    import warnings

    warnings.filterwarnings("ignore")
    task = json.loads(task_json)
    import torch

    torch.set_num_threads(int(task.get("threads", 2)))
    t0 = time.perf_counter()
    out: dict = {"task": task}
    try:
        m = registry[task["kind"]](task)
        out.update(
            status="ok",
            times=m.times,
            phases=m.phases,
            warmup_s=m.warmup_s,
            baseline_mb=m.baseline_mb,
            peak_extra_mb=m.peak_extra_mb,
            info=m.info,
        )
    except BaseException as exc:  # noqa: BLE001 - report every failure as a result
        out.update(
            status="oom" if is_oom(exc) else "error",
            error=f"{type(exc).__name__}: {str(exc)[:400]}",
            trace=traceback.format_exc()[-1500:],
        )
    out["worker_s"] = time.perf_counter() - t0
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(RESULT_TAG + json.dumps(out, default=float) + "\n")
    sys.stdout.flush()


def run_worker(script: str, task: dict, timeout: float, python: str | None = None) -> dict:
    """Run ``task`` in a fresh ``python script --worker`` process; never raises."""
    cmd = [python or sys.executable, script, "--worker", json.dumps(task)]
    t = time.perf_counter()
    fl = ForeignLoad()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "task": task,
            "status": "timeout",
            "error": f"killed after {timeout:.0f} s",
            "foreign_cores": fl.stop(),
        }
    wall = time.perf_counter() - t
    foreign = fl.stop()
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG) :])
            res["process_s"] = wall
            res["foreign_cores"] = foreign
            res["child_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            return res
    if proc.returncode < 0:
        sig = -proc.returncode
        status = "killed/oom" if sig == 9 else f"killed (signal {sig})"
        return {
            "task": task,
            "status": status,
            "error": f"signal {sig}",
            "process_s": wall,
            "foreign_cores": foreign,
        }
    return {
        "task": task,
        "status": "error",
        "error": f"exit code {proc.returncode}: {proc.stderr[-600:]}",
        "process_s": wall,
        "foreign_cores": foreign,
    }


def wait_quiet_cpu(threshold: float, max_wait_s: float, window_s: float = 5.0) -> float:
    """Wait until other processes use less than ``threshold`` cores over a ``window_s`` window
    (or ``max_wait_s`` passed); returns the last measured value."""
    start = time.time()
    while True:
        fl = ForeignLoad()
        time.sleep(window_s)
        busy = fl.stop()
        if busy < threshold or time.time() - start >= max_wait_s:
            return busy


def run_worker_retry(
    script: str,
    task: dict,
    timeout: float,
    retries: int = 2,
    threshold: float = 0.25,
    max_wait_s: float = 120.0,
    log=None,
) -> dict:
    """:func:`run_worker`, repeated (after waiting for a quiet CPU) while other processes kept
    more than ``threshold`` cores busy during the run; returns the quietest attempt."""
    best = None
    for attempt in range(retries + 1):
        res = run_worker(script, task, timeout)
        res["attempt"] = attempt + 1
        if best is None or res.get("foreign_cores", 0) < best.get("foreign_cores", 0):
            best = res
        busy = res.get("foreign_cores", 0.0)
        if busy <= threshold or res.get("status") not in ("ok",) or attempt == retries:
            break
        if log:
            log(f"    other processes used {busy:.2f} cores during the run: waiting, then retry")
        wait_quiet_cpu(threshold, max_wait_s)
    best["attempts"] = attempt + 1
    return best


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x``."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx if sxx > 0 else None


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 60.0, log=print) -> float:
    """Sleep until the 1-minute load average is below ``threshold`` (or ``max_wait_s`` passed);
    returns the load average at the end."""
    start = time.time()
    while True:
        la = os.getloadavg()[0]
        if la < threshold or time.time() - start >= max_wait_s:
            return la
        log(f"load average {la:.2f} >= {threshold}: waiting {poll_s:.0f} s")
        time.sleep(poll_s)
