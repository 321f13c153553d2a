"""Where the device classes' slowdown factors come from: published board latencies over this host's own.

The published figures (cited in devices/classes/*.toml) are FP32 MobileNetV2 1.0 at 224x224, batch 1, on the
boards' CPUs. The denominator is measured here: the same architecture (random weights: latency does not depend
on them) exported to ONNX and run by onnxruntime on ONE thread, as the agent runs. A device class's factor is
board ms / host ms, the host's figure being the fastest run: the boards' figures are benchmark runs on
dedicated boards, and on a shared machine only the fastest runs are undisturbed (the median is printed too).
Prints a table and, last, one JSON line {"host_mobilenetv2_ms", "factors"}; writes results/device_classes.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
# Single-thread board figures in ms; the class TOMLs cite the pages. XNNPACK's README: MobileNet v2 1.0X takes
# 44 ms on a Raspberry Pi 4 with 4 threads, and 53 ms (1 thread) vs 18 ms (4 threads) on a Pixel 2 (four big
# cores), so one Pi 4 core is ~44 * 53/18. aallan/benchmarking-ml-on-the-edge: TFLite MobileNet v2 takes
# 112.6 ms on a Pi 4 and 23.5 ms on a Pi 5 in the same harness. Jetson Nano: no published CPU-only figure found;
# an ESTIMATE of the Pi 4 core x 1.35 (Cortex-A57 @ 1.43 GHz vs A72 @ 1.5 GHz). Pixel 3a: XNNPACK, 1 thread.
PI4_MS = 44.0 * 53.0 / 18.0
BOARD_MS = {"raspberry-pi-4": PI4_MS, "raspberry-pi-5": PI4_MS * 23.5 / 112.6, "jetson-nano": PI4_MS * 1.35,
            "mid-range-phone": 55.0}


def mobilenet_v2():  # noqa: ANN201  torch is imported lazily
    """MobileNetV2 1.0 (Sandler et al. 2018, table 2), written out because torchvision is not installed."""
    from torch import nn

    def cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6())

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int):
            super().__init__()
            hidden = cin * t
            layers = [cbr(cin, hidden, 1)] if t != 1 else []
            layers += [cbr(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                       nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):  # noqa: ANN001, ANN202
            return x + self.body(x) if self.residual else self.body(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)):
                for i in range(n):
                    layers.append(Block(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(cbr(320, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, 1000)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.classifier(self.features(x).mean(dim=(2, 3)))

    return Net().eval()


def host_ms(repeats: int) -> list[float]:
    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobilenet_v2.onnx"
        torch.onnx.export(mobilenet_v2(), (torch.zeros(1, 3, 224, 224),), str(path), external_data=False,
                          input_names=["input"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    for _ in range(5):
        sess.run(None, {"input": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    times = host_ms(args.repeats)
    host = best = min(times)
    med, p10 = statistics.median(times), float(np.percentile(times, 10))
    factors = {name: round(ms / host, 2) for name, ms in BOARD_MS.items()}
    print(f"host: {_cpu()}; MobileNetV2 1.0 224x224 fp32, onnxruntime, 1 thread, {len(times)} runs: "
          f"fastest {best:.1f} ms (p10 {p10:.1f}, median {med:.1f})")
    for name, ms in BOARD_MS.items():
        print(f"  {name:16s} board ~{ms:6.1f} ms -> factor {ms / host:5.2f}")
    result = {"host": _cpu(), "host_mobilenetv2_ms": round(host, 2), "host_p10_ms": round(p10, 2),
              "host_median_ms": round(med, 2), "board_ms": {k: round(v, 1) for k, v in BOARD_MS.items()},
              "factors": factors}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "device_classes.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
