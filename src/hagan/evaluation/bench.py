"""Memory and speed benchmark of the models (paper Fig. 6, Tables VII and VIII).

For each model in ``hagan.models.MODELS``, each output size and each batch size, ``run_bench`` measures
parameter counts, training iterations per second (one iteration = all of a model's update steps; for
HA-GAN the D, G, E^H and E^G steps of ``train_step``, on random data in [-1, 1]), the peak memory of
training, the time to generate one volume and its peak memory, and the FLOPs of one iteration and one
generation counted with ``torch.utils.flop_counter``'s formulas (convolutions and matrix products
only), from which the achieved TFLOP/s follow.

Any registered ``GenerativeModel`` can be measured: parameters are counted per child module (HA-GAN's by
its seven paper modules), the random batch has the trainer's keys and ``model.size``, and the memory
guard's estimate uses the model's ``memory_probes(batch_size)`` where it has one (a callable per update
step running that step's forward passes), else no training estimate and no training guard. A model
whose module cannot be imported, or that cannot be built at a size, is a row saying so.

Peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` on GPU, and the
peak resident set size on CPU. On Linux the CPU peak is the kernel's ``VmHWM`` of the measuring process,
reset before each phase through ``/proc/self/clear_refs``; ``getrusage().ru_maxrss`` is not used there
because a child started by a large parent inherits the parent's high-water mark at ``exec`` (the child's
``ru_maxrss`` reads at least the parent's size). Elsewhere ``ru_maxrss`` of a fresh child is used.

With ``isolate=True`` every measurement runs in a fresh ``python -m hagan.evaluation.bench --one JSON`` child (on
CPU one child per phase, so training and generation do not share allocator caches); the first child's
peak resident size before it builds anything (torch and hagan imported) is the idle baseline reported
in every CPU row, so the increment of each configuration is visible.

A configuration that does not fit is a row, never a crash: ``"out of memory"`` (CUDA OOM, MemoryError,
a child killed by the kernel), ``"skipped: predicted ... > limit ..."`` (a meta-device estimate of the
memory above the available RAM), ``"skipped: time limit ..."`` (``max_seconds`` predicted from the
first iteration, or the child's hard timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..config import MODEL_SIZES, build_config
from ..data.io import atomic_write, write_text_atomic
from ..models import MODELS, build_model, model_class
from ..training.accel import configure_cuda, resolve_device, resolve_precision

RESULT_MARKER = "HAGAN_BENCH_RESULT "
DEFAULT_SIZES = (32, 64, 128)
MEMORY_HEADROOM = 0.9          # of MemAvailable, the default CPU memory limit
TRAIN_ACTIVATION_FACTOR = 2.0  # saved activations plus their gradients during backward
GEN_LAYER_FACTOR = 2.0         # a layer's input and output plus a reordered copy (oneDNN) or workspace
ESTIMATE_SAFETY = 1.5          # measured CPU peaks above idle were 0.7-1.4x the estimate, 32^3 to 128^3
CHILD_TIMEOUT_SLACK_S = 120.0  # interpreter and torch start-up, model build, on top of max_seconds

ROW_KEYS = (
    "model", "size", "batch", "width", "device", "device_name", "torch", "dtype", "channels_last", "compile",
    "tile_depth", "threads",
    "params", "params_total", "train_it_per_s", "train_seconds_per_it", "train_peak_mem_bytes",
    "gen_seconds_per_volume", "gen_peak_mem_bytes", "generate_batch", "flops_per_iteration", "tflops",
    "gen_flops_per_volume", "gen_tflops", "mem_kind", "idle_rss_bytes", "estimated_train_mem_bytes",
    "estimated_gen_mem_bytes", "iterations", "warmup", "isolated", "train_status", "gen_status", "status",
)


class SkipConfig(Exception):
    """A configuration refused before or while running (time or memory guard); its message is the status."""


# ----- machine ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} CPUs)"


def available_ram_bytes() -> int:
    """MemAvailable on Linux; physical memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident size of this process: VmHWM on Linux, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int | None:
    return _status_kib("VmRSS")


# ----- configurations ----------------------------------------------------------------------------------
def bench_config(model: str, size: int, batch: int, width: float, device: str,
                 config_overrides: Sequence[dict] | None = None):
    """The user's overrides first, then the benchmark's own model, size, width and batch."""
    overrides = [*(config_overrides or []),
                 {"model": {"name": model, "size": size, "width": float(width)}},
                 {"optim": {"batch_size": batch}, "train": {"device": device.split(":")[0]}}]
    return build_config(None, None, overrides)


def module_param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per module (the keys of ``hagan summary``) and their total."""
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in model.parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def meta_model(config) -> nn.Module:
    """The model on the meta device: shapes only, no memory (spectral norm's set-up still costs a second or so)."""
    with torch.device("meta"):
        return build_model(config)


def param_counts(config, model: nn.Module | None = None) -> dict[str, int]:
    return module_param_counts(model if model is not None else meta_model(config))


def _leaf_output_bytes(model: nn.Module, fn) -> tuple[int, int]:
    """Run ``fn`` on the meta device; the sum of every leaf module's output bytes and the largest
    input-plus-output of one leaf."""
    total, largest = 0, 0

    def nbytes(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (tuple, list)):
            return sum(nbytes(v) for v in x)
        return 0

    def hook(module, inputs, output):
        nonlocal total, largest
        out = nbytes(output)
        total += out
        largest = max(largest, out + nbytes(inputs))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return total, largest


def estimate_memory(config, generate_batch: int = 1, model: nn.Module | None = None) -> dict[str, int | None]:
    """A quick meta-device estimate of peak training and generation memory (bytes), for the guard.

    Training: weights, gradients and two Adam moments, the real batch, and the activations of the largest
    update step (the largest of the model's ``memory_probes``) times ``TRAIN_ACTIVATION_FACTOR``.
    Generation: weights plus ``GEN_LAYER_FACTOR`` times the largest input-plus-output of one layer of the
    model's ``generation_probe``. Meant to be within a factor of about two; the guard multiplies it by
    ``ESTIMATE_SAFETY``. None where a model offers no way to estimate a phase (no ``memory_probes``, or a
    pass that does not run on the meta device).
    """
    model = model if model is not None else meta_model(config)
    model.eval()  # the same activations; spectral norm skips its power iteration
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    b, s = config.optim.batch_size, config.model.size
    estimate: dict[str, int | None] = {"train": None, "generate": None}
    try:
        probes = model.memory_probes(b)
        if probes is not None:
            largest = max(_leaf_output_bytes(model, probe)[0] for probe in probes.values())
            estimate["train"] = int(4 * params + b * s**3 * 4 + TRAIN_ACTIVATION_FACTOR * largest)
    except Exception:  # noqa: BLE001 - no estimate, so no guard for this phase; the measurement still runs
        pass
    try:
        with torch.no_grad():
            layer = _leaf_output_bytes(model, model.generation_probe(generate_batch))[1]
        estimate["generate"] = int(params + GEN_LAYER_FACTOR * layer)
    except Exception:  # noqa: BLE001 - as above
        pass
    return estimate


# ----- one measurement (in this process or a child) --------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    else:
        reset_peak_rss()


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return peak_rss_bytes()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _random_batch(config, device: str, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """What the trainer hands ``train_step``: the same keys, dtypes and shapes (S = ``model.size``)."""
    b, s = config.optim.batch_size, config.model.size
    image = (torch.rand(b, 1, s, s, s, generator=rng) * 2 - 1).to(device)
    if config.model.num_classes:
        label = torch.randint(0, config.model.num_classes, (b,), generator=rng)
    else:
        label = torch.full((b,), -1, dtype=torch.long)
    return {"image": image, "label": label.to(device), "index": torch.arange(b),
            "seed": torch.randint(0, 2**31 - 1, (b,), generator=rng)}


class _FlopCount(TorchDispatchMode):
    """Total FLOPs of the convolutions and matrix products run inside it, by ``FlopCounterMode``'s own
    formulas. ``FlopCounterMode`` itself also tracks modules through backward hooks, which
    ``autograd.grad`` refuses on leaf inputs, so it cannot count a step with a gradient penalty or R1."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _counted(fn) -> tuple[Any, int]:
    with _FlopCount() as counter:
        out = fn()
    return out, int(counter.total)


def _time_guard(max_seconds: float | None, started: float, first_seconds: float, remaining: int, what: str) -> None:
    if not max_seconds:
        return
    elapsed = time.perf_counter() - started
    predicted = elapsed + first_seconds * remaining
    if predicted > max_seconds:
        raise SkipConfig(
            f"skipped: time limit ({what}: {first_seconds:.1f} s for the first, {predicted:.0f} s predicted "
            f"> max_seconds {max_seconds:g})"
        )


def _time_steps(step: Callable[[int], Any], device: str, spec: dict, what: str) -> tuple[int, float]:
    """(FLOPs of one step, seconds per timed step): ``step(i)`` is called once counted, never timed,
    then for the rest of the warm-up (i from 1) and for the timed iterations (i from ``warmup``)."""
    iterations, warmup, max_seconds = spec["iterations"], spec["warmup"], spec.get("max_seconds")
    _sync(device)
    _reset_peak(device)
    started = time.perf_counter()
    # the first step counts FLOPs; it is a warm-up step, never timed
    t0 = time.perf_counter()
    _, flops = _counted(lambda: step(0))
    _sync(device)
    first = time.perf_counter() - t0
    _time_guard(max_seconds, started, first, max(warmup - 1, 0) + iterations, what)
    for i in range(1, warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(iterations):
        step(warmup + i)
    _sync(device)
    return flops, (time.perf_counter() - t0) / iterations


def _measure_train(model, config, device: str, spec: dict, rng: torch.Generator) -> dict[str, Any]:
    batch = _random_batch(config, device, rng)
    model.train()
    flops, seconds = _time_steps(lambda i: model.train_step(batch, i, rng), device, spec, "training")
    return {"train_seconds_per_it": seconds, "train_it_per_s": 1.0 / seconds,
            "train_peak_mem_bytes": _peak(device), "flops_per_iteration": flops,
            "tflops": flops / seconds / 1e12 if flops else None}


def _measure_generate(model, config, device: str, spec: dict, rng: torch.Generator) -> dict[str, Any]:
    n = spec["generate_batch"]
    labels = torch.zeros(n, dtype=torch.long) if config.model.num_classes else None
    model.eval()
    with torch.no_grad():
        flops, seconds = _time_steps(lambda i: model.sample(n, rng, labels), device, spec, "generation")
    seconds /= n
    flops_per_volume = flops // n
    return {"gen_seconds_per_volume": seconds, "gen_peak_mem_bytes": _peak(device),
            "gen_flops_per_volume": flops_per_volume,
            "gen_tflops": flops_per_volume / seconds / 1e12 if flops_per_volume else None}


def measure_one(spec: dict) -> dict[str, Any]:
    """Measure the phases listed in ``spec["phases"]`` ("train", "generate") of one configuration here.

    Returns the measured fields plus ``train_status`` / ``gen_status`` ("ok", "out of memory",
    "skipped: ...", "error: ..."); never raises for a configuration that does not fit.
    """
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if device.startswith("cuda"):
        configure_cuda()
    config = bench_config(spec["model"], spec["size"], spec["batch"], spec["width"], device, spec.get("config_overrides"))
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    limit = spec.get("memory_limit_bytes")
    estimate = spec.get("estimate") or {}
    for phase in spec["phases"]:
        key = "train_status" if phase == "train" else "gen_status"
        needed = estimate.get("train" if phase == "train" else "generate")
        if limit and needed and needed > limit:
            out[key] = f"skipped: predicted {_gib(needed)} > limit {_gib(limit)}"
            continue
        model = None
        try:
            torch.manual_seed(spec.get("seed", 0))
            rng = torch.Generator().manual_seed(spec.get("seed", 0))
            model = build_model(config).to(device).accelerate()
            model.tile_depth = int(spec.get("tile_depth") or 0)
            measure = _measure_train if phase == "train" else _measure_generate
            out.update(measure(model, config, device, spec, rng))
            out[key] = "ok"
        except SkipConfig as err:
            out[key] = str(err)
        except Exception as err:  # noqa: BLE001 - a benchmark row, not a crash
            if _is_oom(err):
                out[key] = "out of memory"
            else:
                out[key] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                out.setdefault("traceback", traceback.format_exc(limit=5))
        finally:
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return out


# The child is ``python -m hagan.evaluation.bench`` without running ``hagan/__init__.py``: that file imports the
# inference API and with it the trainer, TensorBoard and SciPy (about 5 s of CPU and 150 MB of RSS per
# process), none of which a measurement needs. The package module is created from its spec unexecuted.


def _run_child(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run ``python -m hagan.evaluation.bench ARGS`` and parse its result line; failures become a status."""
    cmd = [sys.executable, "-m", "hagan.evaluation.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"_child_status": f"skipped: time limit (child killed after {timeout:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    if proc.returncode in (-9, 137):
        return {"_child_status": "out of memory (child killed by signal 9)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    if "MemoryError" in tail[0] or "out of memory" in tail[0].lower():
        return {"_child_status": "out of memory"}
    return {"_child_status": f"error: child exited with {proc.returncode}: {tail[0]}"}


def idle_rss_bytes(isolate: bool = True) -> int | None:
    """Peak resident size of an idle child (torch and hagan imported, nothing built)."""
    if not isolate:
        return None
    result = _run_child(["--idle"], timeout=300)
    return result.get("idle_rss_bytes")


# ----- the benchmark ---------------------------------------------------------------------------------------
def _overall(train_status: str, gen_status: str) -> str:
    for status in (train_status, gen_status):
        if status != "ok":
            return status
    return "ok"


def _one_config(model_name: str, size: int, batch: int, *, device: str, iterations: int, warmup: int,
                generate_batch: int, width: float, config_overrides, isolate: bool, max_seconds: float | None,
                memory_limit_bytes: int | None, threads: int | None, idle: dict[str, int], name: str,
                gen_cache: dict[str, Any] | None = None, tile_depth: int = 0) -> dict[str, Any]:
    try:
        config = bench_config(model_name, size, batch, width, device, config_overrides)
        shapes = meta_model(config)
    except Exception as err:  # noqa: BLE001 - e.g. a size the model does not support: a row, not a crash
        return {"model": model_name, "size": size, "batch": batch, "width": width, "device": device,
                "device_name": name, "torch": torch.__version__,
                "status": f"skipped: cannot build {model_name} at {size}^3 ({type(err).__name__}: {err})"}
    counts = param_counts(config, shapes)
    estimate = estimate_memory(config, generate_batch, shapes)
    cuda = device.startswith("cuda")
    limit = memory_limit_bytes
    if limit is None and not cuda:
        limit = int(MEMORY_HEADROOM * available_ram_bytes())
    spec = {"model": model_name, "size": size, "batch": batch, "width": width, "device": device,
            "iterations": iterations, "warmup": warmup, "generate_batch": generate_batch,
            "config_overrides": list(config_overrides or []), "max_seconds": max_seconds,
            "memory_limit_bytes": limit, "estimate": estimate, "threads": threads, "seed": 0,
            "tile_depth": tile_depth}
    row: dict[str, Any] = {
        "model": model_name, "size": size, "batch": batch, "width": width, "device": device,
        "device_name": name, "torch": torch.__version__,
        "dtype": {"fp32": "float32", "bf16": "bfloat16 autocast"}[resolve_precision(config.train.precision, device)],
        "channels_last": config.train.channels_last, "compile": config.train.compile, "tile_depth": tile_depth,
        "threads": threads,
        "params": {k: v for k, v in counts.items() if k != "total"}, "params_total": counts["total"],
        "train_it_per_s": None, "train_seconds_per_it": None, "train_peak_mem_bytes": None,
        "gen_seconds_per_volume": None, "gen_peak_mem_bytes": None, "generate_batch": generate_batch,
        "flops_per_iteration": None, "tflops": None, "gen_flops_per_volume": None, "gen_tflops": None,
        "mem_kind": "cuda_max_memory_allocated" if cuda else "peak_rss",
        "idle_rss_bytes": idle.get("bytes"), "estimated_train_mem_bytes": estimate["train"],
        "estimated_gen_mem_bytes": estimate["generate"], "iterations": iterations, "warmup": warmup,
        "isolated": isolate,
    }
    if cuda:
        row["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        row["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    timeout = (max_seconds + CHILD_TIMEOUT_SLACK_S) if max_seconds else None
    # generation does not depend on the training batch: measured once per model and size, then reused
    phases_wanted = ["train"] if gen_cache is not None and "gen_status" in gen_cache else ["train", "generate"]
    for phase, key, status_key in (("train", "train", "train_status"), ("generate", "generate", "gen_status")):
        # on CPU the peak RSS includes the idle process
        if estimate[key] is None:  # the model offers no estimate of this phase: measured unguarded
            continue
        needed = int(ESTIMATE_SAFETY * estimate[key]) + (0 if cuda else idle.get("bytes", 0))
        if phase in phases_wanted and limit and needed > limit:  # refused before any child starts
            row[status_key] = f"skipped: predicted {_gib(needed)} > limit {_gib(limit)}"
            phases_wanted.remove(phase)
    # on CPU a fresh child per phase, since a process's peak RSS covers its whole life; on GPU one child
    phase_groups = [[p] for p in phases_wanted] if (isolate and not cuda) else [phases_wanted] * bool(phases_wanted)
    for phases in phase_groups:
        if isolate:
            result = _run_child(["--one", json.dumps({**spec, "phases": phases})], timeout)
            if "_child_status" in result:
                result = {("train_status" if p == "train" else "gen_status"): result["_child_status"] for p in phases}
        else:
            result = measure_one({**spec, "phases": phases})
        if "idle_rss_bytes" in result and not cuda:
            idle.setdefault("bytes", result.pop("idle_rss_bytes"))
            row["idle_rss_bytes"] = idle["bytes"]
        result.pop("idle_rss_bytes", None)
        result.pop("idle_current_rss_bytes", None)
        row.update({k: v for k, v in result.items() if k != "threads" or v is not None})
    if gen_cache is not None:
        if "generate" in phases_wanted:
            gen_cache.update({k: v for k, v in row.items() if k.startswith("gen_")})
        else:
            row.update(gen_cache)
    row["train_status"] = row.get("train_status", "not run")
    row["gen_status"] = row.get("gen_status", "not run")
    row["status"] = _overall(row["train_status"], row["gen_status"])
    return row


def run_bench(
    models: Iterable[str] = ("hagan",),
    sizes: Iterable[int] = DEFAULT_SIZES,
    batch_sizes: Iterable[int] = (2, 4),
    device: str = "auto",
    iterations: int = 5,
    warmup: int = 2,
    generate_batch: int = 1,
    width: float = 1.0,
    config_overrides: Sequence[dict] | None = None,
    isolate: bool = True,
    progress: bool = True,
    max_seconds: float | None = 600.0,
    memory_limit_bytes: int | None = None,
    threads: int | None = None,
    tile_depth: int = 0,
) -> list[dict[str, Any]]:
    """One row per (model, size, batch): parameters, training speed and peak memory, generation time
    per volume and its peak memory, FLOPs and TFLOP/s, and a status.

    ``iterations`` timed iterations follow ``warmup`` untimed ones (the first of which counts FLOPs; with
    ``warmup=0`` one FLOP-counting iteration still runs untimed). Generation uses batches of
    ``generate_batch`` volumes with the same counts. ``max_seconds`` bounds each phase of a configuration
    (predicted from its first iteration; in a child also a hard timeout); ``memory_limit_bytes`` is the
    memory guard (default on CPU: 90 % of the available RAM; on GPU none, a CUDA OOM is caught instead).
    ``threads`` sets ``torch.set_num_threads`` in the measuring process; ``tile_depth`` > 0 generates
    with G^H over depth tiles. Precision, channels-last and compilation come from ``config_overrides``
    (``train.precision``, ``train.channels_last``, ``train.compile``). A model not in
    ``hagan.models.MODELS``, one whose module cannot be imported, and one that cannot be built at a
    size each give a row saying so.
    """
    if iterations < 1 or warmup < 0 or generate_batch < 1:
        raise ValueError("iterations and generate_batch must be at least 1 and warmup not negative")
    sizes, batch_sizes, models = list(sizes), list(batch_sizes), list(models)
    for size in sizes:
        if size not in MODEL_SIZES:
            raise ValueError(f"sizes must be among {', '.join(map(str, MODEL_SIZES))}, got {size}")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be at least 1, got {batch_sizes}")
    device = str(resolve_device(device))
    name = device_name(device)
    idle: dict[str, int] = {}  # the first child's resident size before it builds anything
    rows: list[dict[str, Any]] = []
    for model_name in models:
        if model_name not in MODELS:
            rows.append({"model": model_name, "device": device, "device_name": name, "torch": torch.__version__,
                         "status": f"skipped: unknown model (available: {', '.join(MODELS)})"})
            continue
        try:
            model_class(model_name)
        except (ImportError, AttributeError) as err:  # registered, but its module is not (yet) there
            rows.append({"model": model_name, "device": device, "device_name": name, "torch": torch.__version__,
                         "status": f"skipped: model not available ({MODELS[model_name]}: {err})"})
            continue
        for size in sizes:
            gen_cache: dict[str, Any] = {}
            for batch in batch_sizes:
                t0 = time.perf_counter()
                row = _one_config(model_name, size, batch, device=device, iterations=iterations, warmup=warmup,
                                  generate_batch=generate_batch, width=width, config_overrides=config_overrides,
                                  isolate=isolate, max_seconds=max_seconds, memory_limit_bytes=memory_limit_bytes,
                                  threads=threads, idle=idle, name=name, gen_cache=gen_cache,
                                  tile_depth=tile_depth)
                rows.append(row)
                if progress:
                    print(format_row(row) + f"  [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    def mem(v):
        return "-" if v is None else f"{v / 2**30:.2f} GiB"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    if "size" not in row:
        return f"{row['model']}: {row['status']}"
    if "params_total" not in row:
        return f"{row['model']} {row['size']}^3 batch {row['batch']}: {row['status']}"
    return (f"{row['model']} {row['size']}^3 batch {row['batch']} width {row['width']:g} on {row['device']}: "
            f"train {num(row.get('train_it_per_s'), '.3g')} it/s peak {mem(row.get('train_peak_mem_bytes'))}, "
            f"generate {num(row.get('gen_seconds_per_volume'), '.3g')} s/volume peak "
            f"{mem(row.get('gen_peak_mem_bytes'))}, {num(row.get('tflops'), '.3g')} / "
            f"{num(row.get('gen_tflops'), '.3g')} TFLOP/s, params {row['params_total'] / 1e6:.2f} M "
            f"[{row['status']}]")


# ----- output ----------------------------------------------------------------------------------------------
def plot_bench(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Like the paper's Fig. 6: peak memory and speed against resolution, one line per model / batch / width / device."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0, 0], "train_peak_mem_bytes", 2**-30, "training peak memory (GiB)"),
        (axes[0, 1], "train_it_per_s", 1.0, "training iterations / s"),
        (axes[1, 0], "gen_peak_mem_bytes", 2**-30, "generation peak memory (GiB)"),
        (axes[1, 1], "gen_seconds_per_volume", 1.0, "generation s / volume"),
    ]
    lines: dict[tuple, list[dict]] = {}
    for row in rows:
        if "size" in row:
            lines.setdefault((row["model"], row["batch"], row["width"], row["device"]), []).append(row)
    sizes = sorted({row["size"] for row in rows if "size" in row}) or list(DEFAULT_SIZES)
    idle = [row.get("idle_rss_bytes") for row in rows if row.get("idle_rss_bytes")]
    from matplotlib.ticker import FuncFormatter, LogLocator

    for ax, key, scale, label in panels:
        seen: set[tuple] = set()
        for i, ((model, batch, width, device), group) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
            group = sorted(group, key=lambda r: r["size"])
            if key.startswith("gen"):  # generation does not depend on the training batch: one line
                if (model, width, device) in seen:
                    continue
                seen.add((model, width, device))
            pts = [(r["size"], r[key] * scale) for r in group if r.get(key) is not None]
            tag = f"{model} b{batch}" + (f" w{width:g}" if width != 1.0 else "") + f" {device}"
            if key.startswith("gen"):
                tag = f"{model} gen x{group[0].get('generate_batch', 1)}" + (f" w{width:g}" if width != 1.0 else "") + f" {device}"
            if pts:
                ax.plot(*zip(*pts), marker="o", label=tag, color=f"C{i}")
            for r in group:
                if r.get(key) is None and r.get("status", "ok") != "ok":
                    ax.annotate("x", (r["size"], 1), xycoords=("data", "axes fraction"), ha="center", va="top",
                                color="red")
        if "mem" in key and idle:
            ax.axhline(min(idle) * scale, color="grey", ls="--", lw=1, label="idle process RSS")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s}^3" for s in sizes])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if key.startswith("gen"):
            ax.legend(fontsize=7)
        ax.set_xlabel("output resolution")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    names = sorted({row.get("device_name", "?") for row in rows})
    fig.suptitle(f"hagan bench: {', '.join(names)} (x: not measured, see status)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    out = Path(path)
    with atomic_write(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def save_bench(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``OUT/bench.json`` (rows plus the machine and date) and ``OUT/bench.png``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "python": platform.python_version(), "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "rows": rows}
    json_path = write_text_atomic(out / "bench.json", json.dumps(payload, indent=2) + "\n")
    png_path = plot_bench(rows, out / "bench.png")
    return json_path, png_path


# ----- child entry point -------------------------------------------------------------------------------------
def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hagan.evaluation.bench", description="one measurement of hagan bench")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--one", metavar="JSON", help="a measurement spec as written by run_bench")
    group.add_argument("--idle", action="store_true", help="report the resident size of an idle process")
    args = parser.parse_args(argv)
    # before anything is built: the resident size of an idle process with torch and hagan imported
    idle = {"idle_rss_bytes": peak_rss_bytes(), "idle_current_rss_bytes": current_rss_bytes()}
    result: dict[str, Any] = idle if args.idle else {**measure_one(json.loads(args.one)), **idle}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
