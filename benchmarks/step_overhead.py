"""Per-step cost of ``SVI.step``: distsvi vs the same ELBO hand-written in torch, and Pyro.

Run: ``python benchmarks/step_overhead.py [--steps 10] [--rounds 40] [--models tiny,logreg]``

Four models, as users write them:

- ``tiny``: one latent, four observations, a guide of hand-placed ``param``s;
- ``logreg``: logistic regression, N=10000, D=50, subsample 256, ``AutoNormal``;
- ``hier``: 100 groups of 20 observations, ``mu``, ``tau ~ HalfCauchy``,
  ``sigma ~ HalfNormal``, ``theta`` in a plate, ``AutoNormal``;
- ``vae``: an amortized MLP encoder (64 -> 128 -> 2x8) and decoder (8 -> 128 -> 64),
  subsample 128 of 5000.

The floor ("hand") is each model's ELBO written in plain torch: ``rsample``, ``log_prob``,
``backward`` and one foreach ``torch.optim.Adam``, with the same parameterisation as the
guide (AutoNormal's softplus scales and the Jacobian of each site's map to its support).
distsvi's optimizers use torch's fused kernels where torch has them (``fused=True``), so
the table also gives the floor with a fused Adam: ``distsvi / hand, fused Adam`` is the
engine's own overhead, the optimizers being the same.
"Compiled" is ``torch.compile`` of the hand-written loss and of Adam's step, against
``SVI(..., compile=True)``. All implementations of a model run in one process, on one
thread, interleaved in rounds of ``--steps`` steps (the machine is shared and its speed
drifts, so a drift slows them alike), each step timed by the thread's CPU time; the table
gives the median microseconds per step and the ratios to the floor. Goals: eager distsvi / hand <= 1.15, compiled <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LR = 0.01
N_LR, D_LR, B_LR = 10_000, 50, 256
GROUPS, PER_GROUP = 100, 20
N_VAE, X_DIM, Z_DIM, HIDDEN, B_VAE = 5000, 64, 8, 128, 128
TINY_OBS = torch.tensor([0.3, -0.2, 1.1, 0.7])
# The thread's CPU time: on a shared machine, time spent descheduled is not the step's.
# (Everything runs on this one thread: one intra-op thread, CPU autograd in the caller.)
CLOCK = time.thread_time


# data --------------------------------------------------------------------------------
def logreg_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_LR, D_LR, generator=g)
    w = torch.randn(D_LR, generator=g)
    return X, torch.bernoulli(torch.sigmoid(X @ w), generator=g)


def hier_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    group = torch.arange(GROUPS).repeat_interleave(PER_GROUP)
    theta = 2.0 + torch.randn(GROUPS, generator=g)
    return group, theta[group] + 0.5 * torch.randn(len(group), generator=g)


def vae_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N_VAE, X_DIM, generator=g)


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * Z_DIM))


def decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, X_DIM))


# the models, written once for distsvi and Pyro -----------------------------------------
def ppl_tiny(pyro, dist, autoguide):
    from torch.distributions import constraints

    def model(obs):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", len(obs)):
            pyro.sample("x", dist.Normal(z, 1.0), obs=obs)

    def guide(obs):
        loc = pyro.param("z_loc", torch.tensor(0.0))
        scale = pyro.param("z_scale", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    return model, guide, (TINY_OBS,)


def ppl_logreg(pyro, dist, autoguide):
    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D_LR), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N_LR, subsample_size=B_LR) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w + b), obs=y[idx])

    return model, autoguide.AutoNormal(model), logreg_data()


def ppl_hier(pyro, dist, autoguide):
    def model(group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        with pyro.plate("groups", GROUPS):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(theta[group], sigma), obs=y)

    return model, autoguide.AutoNormal(model), hier_data()


def ppl_vae(pyro, dist, autoguide):
    enc, dec = encoder(), decoder()

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", N_VAE, subsample_size=B_VAE) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), 1.0).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", N_VAE, subsample_size=B_VAE) as idx:
            h = enc(x[idx])
            pyro.sample("z", dist.Normal(h[:, :Z_DIM], F.softplus(h[:, Z_DIM:])).to_event(1))

    return model, guide, (vae_data(),)


# the hand-written floors ----------------------------------------------------------------
Normal = torch.distributions.Normal


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _softplus_inv(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def hand_tiny() -> tuple[Callable, list[torch.Tensor]]:
    loc, us = _leaves(torch.tensor(0.0), torch.tensor(0.0))  # scale = exp(0) = 1

    def loss_fn():
        q = Normal(loc, us.exp())
        z = q.rsample()
        logp = Normal(0.0, 1.0).log_prob(z) + Normal(z, 1.0).log_prob(TINY_OBS).sum()
        return q.log_prob(z) - logp

    return loss_fn, [loc, us]


def hand_logreg() -> tuple[Callable, list[torch.Tensor]]:
    X, y = logreg_data()
    s0 = _softplus_inv(torch.tensor(0.1))
    w_loc, w_s, b_loc, b_s = _leaves(torch.zeros(D_LR), s0.expand(D_LR), torch.tensor(0.0), s0)
    scale = N_LR / B_LR

    def loss_fn():
        qw, qb = Normal(w_loc, F.softplus(w_s)), Normal(b_loc, F.softplus(b_s))
        w, b = qw.rsample(), qb.rsample()
        idx = torch.randperm(N_LR)[:B_LR]
        logits = X[idx] @ w + b
        lik = -F.binary_cross_entropy_with_logits(logits, y[idx], reduction="sum")
        logp = Normal(0.0, 1.0).log_prob(w).sum() + Normal(0.0, 1.0).log_prob(b) + scale * lik
        return qw.log_prob(w).sum() + qb.log_prob(b) - logp

    return loss_fn, [w_loc, w_s, b_loc, b_s]


def hand_hier() -> tuple[Callable, list[torch.Tensor]]:
    group, y = hier_data()
    s0 = _softplus_inv(torch.tensor(0.1))
    # init_to_feasible: 0 in unconstrained space for every site
    params = _leaves(*[torch.tensor(0.0), s0] * 3, torch.zeros(GROUPS), s0.expand(GROUPS))
    mu_l, mu_s, tau_l, tau_s, sig_l, sig_s, th_l, th_s = params
    half_cauchy = torch.distributions.HalfCauchy(2.0)
    half_normal = torch.distributions.HalfNormal(2.0)

    def loss_fn():
        qmu = Normal(mu_l, F.softplus(mu_s))
        qtau = Normal(tau_l, F.softplus(tau_s))
        qsig = Normal(sig_l, F.softplus(sig_s))
        qth = Normal(th_l, F.softplus(th_s))
        mu, ut, us, theta = qmu.rsample(), qtau.rsample(), qsig.rsample(), qth.rsample()
        tau, sigma = ut.exp(), us.exp()
        # log q of a positive site: the Normal's density less log|d exp(u)/du| = u
        logq = qmu.log_prob(mu) + qtau.log_prob(ut) - ut + qsig.log_prob(us) - us
        logq = logq + qth.log_prob(theta).sum()
        logp = Normal(0.0, 5.0).log_prob(mu) + half_cauchy.log_prob(tau)
        logp = logp + half_normal.log_prob(sigma) + Normal(mu, tau).log_prob(theta).sum()
        logp = logp + Normal(theta[group], sigma).log_prob(y).sum()
        return logq - logp

    return loss_fn, params


def hand_vae() -> tuple[Callable, list[torch.Tensor]]:
    x = vae_data()
    enc, dec = encoder(), decoder()
    scale = N_VAE / B_VAE

    def loss_fn():
        idx = torch.randperm(N_VAE)[:B_VAE]
        xb = x[idx]
        h = enc(xb)
        q = Normal(h[:, :Z_DIM], F.softplus(h[:, Z_DIM:]))
        z = q.rsample()
        logp = Normal(0.0, 1.0).log_prob(z).sum() + Normal(dec(z), 1.0).log_prob(xb).sum()
        return scale * (q.log_prob(z).sum() - logp)

    return loss_fn, [*enc.parameters(), *dec.parameters()]


def hand_step(build: Callable, compiled: bool, fused: bool = False) -> Callable[[], float]:
    """zero_grad, backward, one foreach Adam (``fused``: torch's fused Adam); ``compiled``:
    loss and Adam step compiled."""
    loss_fn, params = build()
    kernel = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.Adam(params, lr=LR, **kernel)
    opt_step = opt.step
    if compiled:
        loss_fn, opt_step = torch.compile(loss_fn), torch.compile(opt.step)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# the PPL steps ----------------------------------------------------------------------------
class PPLStep:
    """An SVI step of distsvi or Pyro with params of its own.

    The module's param store is swapped for this implementation's around each timed block
    (outside the timing), by contents, so that the store's dicts keep their identity.
    """

    def __init__(self, lib: str, build: Callable, **svi_kwargs) -> None:
        if lib == "distsvi":
            import distsvi as ppl
            import distsvi.distributions as dist
            from distsvi import infer, optim
            from distsvi.infer import autoguide
        else:
            import pyro as ppl
            import pyro.distributions as dist
            from pyro import infer, optim
            from pyro.infer import autoguide
        self.store = ppl.get_param_store()
        self.fields = [
            f
            for f in ("_params", "_constraints", "_transforms", "_param_to_name")
            if hasattr(self.store, f)
        ]
        self.own = {f: {} for f in self.fields}
        self.saved: dict = {}
        model, guide, self.data = build(ppl, dist, autoguide)
        self.svi = infer.SVI(model, guide, optim.Adam({"lr": LR}), infer.Trace_ELBO(), **svi_kwargs)

    def __enter__(self) -> Callable[[], float]:
        for f in self.fields:
            d = getattr(self.store, f)
            self.saved[f] = dict(d)
            d.clear()
            d.update(self.own[f])
        return lambda: self.svi.step(*self.data)

    def __exit__(self, *exc) -> None:
        for f in self.fields:
            d = getattr(self.store, f)
            self.own[f] = dict(d)
            d.clear()
            d.update(self.saved[f])


class HandStep:
    def __init__(self, build: Callable, compiled: bool, fused: bool = False) -> None:
        self.step = hand_step(build, compiled, fused)

    def __enter__(self) -> Callable[[], float]:
        return self.step

    def __exit__(self, *exc) -> None:
        pass


MODELS = {
    "tiny": ("tiny: 1 latent, 4 obs, params", ppl_tiny, hand_tiny),
    "logreg": (
        f"logistic regression N={N_LR} D={D_LR} B={B_LR}, AutoNormal",
        ppl_logreg,
        hand_logreg,
    ),
    "hier": (f"hierarchical {GROUPS}x{PER_GROUP}, AutoNormal", ppl_hier, hand_hier),
    "vae": (
        f"amortized MLP {X_DIM}-{HIDDEN}-{2 * Z_DIM} / {Z_DIM}-{HIDDEN}-{X_DIM}, B={B_VAE} of {N_VAE}",
        ppl_vae,
        hand_vae,
    ),
}


def time_block(impl, n: int) -> list[float]:
    out = []
    with impl as step:
        for _ in range(n):
            t0 = CLOCK()
            step()
            out.append(CLOCK() - t0)
    return out


def measure(key: str, steps: int, rounds: int, with_pyro: bool, compiled: bool) -> dict:
    _, ppl_build, hand_build = MODELS[key]
    impls = {
        "hand": HandStep(hand_build, False),
        "hand fused": HandStep(hand_build, False, fused=True),
        "distsvi": PPLStep("distsvi", ppl_build),
    }
    if with_pyro:
        impls["pyro"] = PPLStep("pyro", ppl_build)
    if compiled:
        impls["hand compiled"] = HandStep(hand_build, True)
        impls["distsvi compiled"] = PPLStep("distsvi", ppl_build, compile=True)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for impl in impls.values():
        time_block(impl, 20)  # warm-up: params created, compiled, allocator warm
    for r in range(rounds):
        names = list(impls)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in names:
            times[name] += time_block(impls[name], steps)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per round and implementation")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--no-compile", action="store_true", help="eager implementations only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        import pyro
    except ImportError:
        pyro = None
    compiled = not args.no_compile
    print(
        f"median us per step, 1 thread, torch {torch.__version__}"
        + (f", pyro {pyro.__version__}" if pyro else "")
    )
    head = (
        "| model | hand | hand, fused Adam | distsvi | Pyro | distsvi / hand "
        "| distsvi / hand, fused Adam | Pyro / hand |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if compiled:
        head += " hand compiled | distsvi compiled | compiled ratio |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule, flush=True)
    for key in args.models.split(","):
        med = measure(key, args.steps, args.rounds, pyro is not None, compiled)
        h, hf, d, p = med["hand"], med["hand fused"], med["distsvi"], med.get("pyro")
        row = (
            f"| {MODELS[key][0]} | {h:.0f} | {hf:.0f} | {d:.0f} "
            f"| {'-' if p is None else f'{p:.0f}'} | {d / h:.2f} | {d / hf:.2f} "
            f"| {'-' if p is None else f'{p / h:.2f}'} |"
        )
        if compiled:
            hc, dc = med["hand compiled"], med["distsvi compiled"]
            row += f" {hc:.0f} | {dc:.0f} | {dc / hc:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
