"""The correlated-Gaussian check of Poole et al. (2019) with pykd.mi_lower_bound.

x, y in R^20 are jointly Gaussian with componentwise correlation rho, so the true mutual
information is -(20/2) log(1 - rho^2) nats. It steps through 2, 4, 6, 8, 10 nats while separable
MLP critics g(y), h(x) (and, for TUBA and I_alpha, a baseline network on y) are trained to
maximise each bound on batches of 128. Expected: InfoNCE saturates near log(128) = 4.85, NWJ
tracks the truth with high variance, I_alpha (alpha = 0.01) sits between them.

    python examples/mi_gaussian.py [--steps-per-level 1000] [--out mi_gaussian.png]
"""
import argparse
import math
import time

import torch
from torch import nn

import pykd

DIM = 20
BATCH = 128
LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)
# name -> (bound, alpha, trains a baseline)
ESTIMATORS = {
    "InfoNCE": ("infonce", 0.0, False),
    "NWJ": ("nwj", 0.0, False),
    "JS": ("js", 0.0, False),
    "TUBA": ("tuba", 0.0, True),
    "I_alpha (0.01)": ("alpha", 0.01, True),
}


def rho_for(mi: float) -> float:
    """Inverts mi = -(DIM/2) log(1 - rho^2)."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / DIM))


def sample(mi: float, generator: torch.Generator):
    x, noise = torch.randn(2, BATCH, DIM, generator=generator)
    rho = rho_for(mi)
    return x, rho * x + math.sqrt(1.0 - rho**2) * noise


def mlp(out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, out_features))


class SeparableCritic(nn.Module):
    """f(x, y) = <g(y), h(x)>; row i of the score matrix is y_i against every x_j."""

    def __init__(self, with_baseline: bool, embed: int = 32):
        super().__init__()
        self.g, self.h = mlp(embed), mlp(embed)
        self.baseline = mlp(1) if with_baseline else None

    def forward(self, x, y):
        log_q = self.baseline(y).squeeze(1) if self.baseline is not None else None
        return self.g(y), self.h(x), log_q


def train(name: str, steps_per_level: int, seed: int) -> list[float]:
    bound, alpha, with_baseline = ESTIMATORS[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    critic = SeparableCritic(with_baseline)
    optimizer = torch.optim.Adam(critic.parameters(), lr=5e-4)
    estimates = []
    for mi in LEVELS:
        for _ in range(steps_per_level):
            a, b, log_q = critic(*sample(mi, generator))
            estimate = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha)
            optimizer.zero_grad()
            (-estimate).backward()
            optimizer.step()
            estimates.append(float(estimate.detach()))
    return estimates


def summarise(estimates: list[float], steps_per_level: int) -> list[tuple[float, float]]:
    """Mean and std of each level's second half (the critic has adapted by then)."""
    out = []
    for level in range(len(LEVELS)):
        tail = torch.tensor(estimates[level * steps_per_level + steps_per_level // 2:(level + 1) * steps_per_level])
        out.append((float(tail.mean()), float(tail.std())))
    return out


def plot(curves: dict[str, list[float]], steps_per_level: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), sharey=True)
    truth = [mi for mi in LEVELS for _ in range(steps_per_level)]
    for ax, (name, estimates) in zip(axes, curves.items()):
        ax.plot(estimates, alpha=0.4, linewidth=0.7, label="estimate")
        ax.plot(truth, color="black", label="true MI")
        ax.axhline(math.log(BATCH), color="gray", linestyle=":", label="log(batch)")
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylim(-2, 12)
    axes[0].set_ylabel("nats")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-level", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mi_gaussian.png")
    args = parser.parse_args()
    curves = {}
    print(f"{'estimator':16s}" + "".join(f"  MI={mi:>4.1f}      " for mi in LEVELS) + "  seconds")
    for name in ESTIMATORS:
        start = time.perf_counter()
        curves[name] = train(name, args.steps_per_level, args.seed)
        stats = summarise(curves[name], args.steps_per_level)
        columns = "".join(f"  {m:5.2f} ± {s:4.2f}" for m, s in stats)
        print(f"{name:16s}{columns}  {time.perf_counter() - start:6.1f}", flush=True)
    plot(curves, args.steps_per_level, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
