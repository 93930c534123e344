"""Codec speed: encode/decode time, throughput and payload size on one large float32 tensor.

    python benchmarks/codecs.py                       # 4.35M elements, 1 thread
    python benchmarks/codecs.py --numel 25000000 --threads 2 --repeats 10
    python benchmarks/codecs.py --device cuda         # the same tensor, encoded on the GPU

Every figure is the median (or, with ``--stat min``, the minimum) of ``--repeats`` timed calls
after ``--warmup`` untimed ones, in wall time (or, with ``--clock cpu``, process CPU time, which
leaves out the time spent descheduled when other jobs share the machine). On CPU the first call
of CountSketch also builds and caches its hash tables; that one-off cost is printed separately.
GB/s is float32 input bytes (4 * numel) per second, for encode and decode alike; "enc/clone" and
"dec/clone" are times relative to ``x.clone()``, about the cost of one read and one write of the
tensor.

With ``--device cuda`` the tensor (drawn on CPU from the same seed, then copied) and the
generators live on the GPU, and every timed call is bracketed by ``torch.cuda.synchronize()``, so
the figures include the kernels, not just their launch. The header then names the GPU and its
theoretical memory bandwidth (2 * memory clock * bus width, when torch reports them), and two
more columns give each GB/s as a percentage of it: a lower bound on the bandwidth a codec uses,
since it reads and writes more than its input.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lightning_compress.compressors import QSGD, Compressor, CountSketch, TopK


def _no_sync() -> None:
    pass


def timed(
    fn: Callable[[], object],
    repeats: int,
    warmup: int,
    stat: str = "median",
    clock: str = "wall",
    sync: Callable[[], None] = _no_sync,
) -> float:
    """Time of ``fn`` in seconds: the median or the minimum over ``repeats`` calls.

    ``sync`` runs before the clock starts and before it stops (``torch.cuda.synchronize`` on a GPU,
    where ``fn`` only queues kernels), so each figure covers the work itself.
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = now()
        fn()
        sync()
        times.append(now() - start)
    return statistics.median(times) if stat == "median" else min(times)


def peak_bandwidth(device: torch.device) -> float | None:
    """Theoretical memory bandwidth of a CUDA device in bytes/s, or ``None`` if torch does not say.

    ``memory_clock_rate`` is in kHz and the memory transfers twice per clock (DDR and HBM alike):
    2 * clock * bus width / 8 bytes per second, the figure NVIDIA's data sheets quote.
    """
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def naive_qsgd4(x: torch.Tensor, bucket_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A direct transcription of 4-bit QSGD, as a baseline: int64 codes, packing by shifts."""
    s = 7
    v = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % bucket_size)).view(-1, bucket_size)
    scale = v.abs().amax(dim=1, keepdim=True)
    ratio = torch.where(scale > 0, v.abs() / scale, torch.zeros_like(v)) * s
    low = ratio.floor()
    level = low + (torch.rand_like(ratio) < ratio - low).float()
    codes = (torch.sign(v) * level + s).long().reshape(-1)
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 2)).view(-1, 2)
    packed = (codes[:, 0] | (codes[:, 1] << 4)).to(torch.uint8)
    return scale.reshape(-1), packed


def naive_qsgd4_decode(scale: torch.Tensor, packed: torch.Tensor, numel: int, bucket_size: int = 512):
    p = packed.long()
    codes = torch.stack([p & 15, p >> 4], dim=1).reshape(-1)
    padded = -(-numel // bucket_size) * bucket_size
    codes = torch.nn.functional.pad(codes[:numel], (0, padded - numel)).view(-1, bucket_size)
    return ((codes.float() - 7) / 7 * scale.unsqueeze(1)).reshape(-1)[:numel]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=4_350_000, help="elements of the float32 tensor")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--stat", choices=["median", "min"], default="median", help="statistic over repeats")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (leaves out time spent descheduled on a busy machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="where to encode and decode: cpu (default), cuda or cuda:N"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if on_cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but torch.cuda.is_available() is False")
    if on_cuda and args.clock == "cpu":
        parser.error(
            "--clock cpu counts host CPU time only, not GPU work; use --clock wall with --device cuda"
        )
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else _no_sync

    def measure(fn: Callable[[], object], warmup: int = args.warmup) -> float:
        return timed(fn, args.repeats, warmup, args.stat, args.clock, sync)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n = args.numel
    x = torch.randn(n).to(device)
    dense_bytes = 4 * n
    peak = peak_bandwidth(device) if on_cuda else None
    where = platform.machine()
    if on_cuda:
        where += f", {device} = {torch.cuda.get_device_name(device)}"
        if peak is not None:
            where += f" ({peak / 1e9:,.0f} GB/s theoretical memory bandwidth)"
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} thread(s), "
        f"numel={n:,} ({dense_bytes / 1e6:.1f} MB float32), {args.stat} {args.clock} time of {args.repeats}"
    )

    clone_s = measure(lambda: x.clone())
    rows: list[tuple[str, float, float | None, int | None]] = [("x.clone()", clone_s, None, None)]

    scale, packed = naive_qsgd4(x)
    rows.append(
        (
            "naive QSGD 4-bit (baseline)",
            measure(lambda: naive_qsgd4(x)),
            measure(lambda: naive_qsgd4_decode(scale, packed, n)),
            scale.numel() * 4 + packed.numel(),
        )
    )
    k = math.ceil(0.01 * n)
    rows.append(
        ("torch.topk(|x|, 1%) (baseline)", measure(lambda: torch.topk(x.abs(), k), warmup=1), None, None)
    )

    generator = torch.Generator(device=device).manual_seed(args.seed)
    codecs: list[tuple[str, Compressor]] = [
        ("QSGD 2-bit", QSGD(bits=2)),
        ("QSGD 4-bit", QSGD(bits=4)),
        ("QSGD 8-bit", QSGD(bits=8)),
        ("TopK 1%", TopK(ratio=0.01)),
        ("CountSketch rows=5 k=1%", CountSketch(rows=5, ratio=0.01)),
    ]
    for label, codec in codecs:
        if isinstance(codec, CountSketch):
            sync()
            start = time.perf_counter()
            codec.compress(x)
            sync()
            first_ms = 1e3 * (time.perf_counter() - start)
            what = (
                "computes the hashes, which only CPU caches"
                if on_cuda
                else "builds and caches the hash tables"
            )
            print(f"{label}: first call ({what}) {first_ms:.0f} ms")
        payload = codec.compress(x, generator=generator)
        assert payload.nbytes == codec.payload_nbytes(n)
        encode_s = measure(lambda c=codec: c.compress(x, generator=generator))
        decode_s = measure(lambda c=codec, p=payload: c.decompress(p))
        rows.append((label, encode_s, decode_s, payload.nbytes))

    header = (
        f"{'codec':32s} {'enc ms':>8s} {'dec ms':>8s} {'enc GB/s':>9s} {'dec GB/s':>9s} "
        f"{'enc/clone':>9s} {'dec/clone':>9s} {'payload B':>11s} {'vs fp32':>8s}"
    )
    if peak is not None:
        header += f" {'enc %peak':>9s} {'dec %peak':>9s}"
    print(header)
    print("-" * len(header))
    for label, enc, dec, nbytes in rows:
        cells = [f"{label:32s}", f"{1e3 * enc:8.2f}"]
        cells.append(f"{1e3 * dec:8.2f}" if dec is not None else f"{'':8s}")
        cells.append(f"{dense_bytes / enc / 1e9:9.2f}")
        cells.append(f"{dense_bytes / dec / 1e9:9.2f}" if dec is not None else f"{'':9s}")
        cells.append(f"{enc / clone_s:9.1f}")
        cells.append(f"{dec / clone_s:9.1f}" if dec is not None else f"{'':9s}")
        cells.append(f"{nbytes:11,d}" if nbytes is not None else f"{'':11s}")
        cells.append(f"{dense_bytes / nbytes:7.1f}x" if nbytes else f"{'':8s}")
        if peak is not None:  # achieved GB/s as a share of the theoretical memory bandwidth
            cells.append(f"{100 * dense_bytes / enc / peak:8.1f}%")
            cells.append(f"{100 * dense_bytes / dec / peak:8.1f}%" if dec is not None else f"{'':9s}")
        print(" ".join(cells))


if __name__ == "__main__":
    main()
