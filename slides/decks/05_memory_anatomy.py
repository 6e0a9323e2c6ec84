"""Deck 05's values: one process's memory taken apart with the tracer (optimizers, mixed
precision), fp16 against bf16, activation recomputation against Korthikanti et al.'s formula,
and the ZeRO stages executed on fake tensors at 7.5e9 parameters against the paper's formulas."""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import labkit
from labkit import plots, simulate, theory

WIDTH, LAYERS4, SAMPLES = 500, 4, 64           # notebook 05's four Linear(500, 500) layers
S, B, H, A, BLOCKS = 128, 4, 128, 4, 4         # notebook 05's transformer blocks
PSI, N_D = 7.5e9, 64                           # the ZeRO paper's example (§5, Figure 1)
STATES = ("params", "grads", "optimizer")


# --- one process: optimizers and precisions --------------------------------------------------

def four_layers(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS4)]).to(dtype)


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, WIDTH, generator=gen), torch.randn(SAMPLES, WIDTH, generator=gen)


def make_optimizer(name, params, lr=1e-3):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd_momentum" else 0.0)


def step_counters(optimizer):
    return sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values()
               if torch.is_tensor(s.get("step")))


def traced_fp32(name, steps=2):
    x, y = _data()
    model = four_layers()
    optimizer = make_optimizer(name, model.parameters())
    with labkit.MemoryTracer(model, optimizer) as mem:
        for _ in range(steps):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    return mem, optimizer


def mixed_precision_step(params, master, optimizer):
    """Notebook 05's recipe: bf16 grads up into the fp32 master, step, master down into bf16."""
    for p, m in zip(params, master):
        m.grad = p.grad.float()
    optimizer.step()
    with torch.no_grad():
        for p, m in zip(params, master):
            p.copy_(m)
            m.grad = None


def traced_mixed(name, steps=2):
    x, y = _data()
    model = copy.deepcopy(four_layers()).to(torch.bfloat16)
    params = list(model.parameters())
    master = [p.detach().to(torch.float32) for p in params]
    optimizer = make_optimizer(name, master)
    mem = labkit.MemoryTracer(model, optimizer)
    mem.tag(master, "optimizer")          # the master copy is optimizer state (ZeRO §3.1)
    with mem:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            F.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
            mixed_precision_step(params, master, optimizer)
    return mem, optimizer


def at_rest(mem, optimizer):
    now = mem.current
    return {"params": now["params"], "grads": now["grads"],
            "optimizer": now["optimizer"] - step_counters(optimizer)}


# --- fp16 and bf16 ---------------------------------------------------------------------------

def finfo_rows():
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        info = torch.finfo(dtype)
        zero = torch.zeros((), dtype=dtype)
        above_zero = torch.nextafter(zero, torch.ones((), dtype=dtype)).item()
        rows.append(f"| {str(dtype).split('.')[-1]} | {info.bits} | {-math.log2(info.eps):g} | "
                    f"{_sci(info.max)} | {_sci(info.tiny)} | {_sci(above_zero)} |")
    return "\n".join(rows)


def underflow_rows():
    """Notebook 05's underflow: inputs 1e-4, loss 1e-4 * sum of outputs: exact gradient 1e-8."""
    torch.manual_seed(0)
    tiny = nn.Linear(8, 1, bias=False)
    x = torch.full((1, 8), 1e-4)
    sgd = torch.optim.SGD(tiny.parameters(), lr=0.0)

    def gradient(dtype, scaler=None):
        sgd.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = tiny(x)
        loss = out.float().sum() * 1e-4
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(sgd)
            scaler.step(sgd)
            scaler.update()
        return tiny.weight.grad[0, 0].item()

    reference = gradient(torch.float32)
    runs = [("fp32, no autocast", torch.float32, None), ("fp16", torch.float16, None),
            ("fp16 + `GradScaler`", torch.float16, torch.amp.GradScaler("cpu")),
            ("bf16", torch.bfloat16, None)]
    rows = []
    for label, dtype, scaler in runs:
        g = gradient(dtype, scaler)
        rows.append(f"| {label} | {_sci(g, 4)} | {_sci(abs(g - reference) / reference)} |")
    return "\n".join(rows), _sci(reference, 4)


# --- activation recomputation ----------------------------------------------------------------

class Block(nn.Module):
    """Notebook 05's pre-LayerNorm transformer block (no mask, no dropout)."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        a, d = self.heads, h // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, a, d).transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-2, -1)) / math.sqrt(d)).softmax(dim=-1)
        x = x + self.proj((probs @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Blocks(nn.Module):
    def __init__(self, recompute):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(H, A) for _ in range(BLOCKS))
        self.recompute = recompute

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return x


def _x_seq():
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(2))


def traced_blocks(recompute):
    model = Blocks(recompute)
    with labkit.MemoryTracer(model) as mem:
        model(_x_seq()).square().mean().backward()
    kept = next(by["activations"] for event, _, by in mem.timeline if event == "after forward")
    peak = max(by["activations"] + by["other"] for _, _, by in mem.timeline)
    return kept, peak


def step_flops():
    """FLOPs (torch's FlopCounterMode) of a forward+backward without and with recomputation,
    and of a forward alone: counted, so the same on every machine, unlike a time."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _x_seq()
    plain, recompute = Blocks(False), Blocks(True)

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def forward():
        with torch.no_grad():
            plain(x)

    return {"plain": count(lambda: plain(x).square().mean().backward()),
            "recompute": count(lambda: recompute(x).square().mean().backward()),
            "forward": count(forward)}


# --- ZeRO at 7.5e9 parameters ----------------------------------------------------------------

def _sci(x, digits=2):
    """A number for a slide: 1.2 × 10⁻⁸, or plain when it reads well that way."""
    if x == 0:
        return "0"
    if abs(x) < 1e5 and x == int(x):
        return f"{x:,.0f}"
    if 1 <= abs(x) < 1e5:
        return f"{x:.{digits + 1}g}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa} × 10<sup>{int(exponent)}</sup>"


def values():
    import matplotlib.pyplot as plt

    out = {}
    num_params = sum(p.numel() for p in four_layers().parameters())
    out["num_params"] = f"{num_params:,}"
    out["layers_label"] = f"{LAYERS4} × `Linear({WIDTH}, {WIDTH}, bias=False)`, batch of {SAMPLES}"

    # one step taken apart: the timeline of fp32 Adam, two steps
    runs = {}
    for name in ("sgd", "sgd_momentum", "adam"):
        runs[name, "fp32"] = traced_fp32(name)
        runs[name, "bf16_mixed"] = traced_mixed(name)
    mem, _ = runs["adam", "fp32"]
    ax = plots.memory_timeline(mem.timeline, unit="MB",
                               title="fp32 Adam, two steps: live bytes by category after each op")
    ax.figure.set_size_inches(10.5, 3.6)
    out["timeline_figure"] = ax.figure
    out["peak_mb"] = f"{mem.peak_total / 1e6:.1f} MB"
    out["peak_event"] = f"`{mem.peak_event}`"
    rest_adam = at_rest(*runs["adam", "fp32"])
    out["states_mb"] = f"{sum(rest_adam.values()) / 1e6:.1f} MB"

    # bytes per parameter, measured and formula
    labels = {"sgd": "SGD", "sgd_momentum": "SGD, momentum", "adam": "Adam"}
    rows = []
    for name in ("sgd", "sgd_momentum", "adam"):
        cells = []
        for precision in ("fp32", "bf16_mixed"):
            rest = at_rest(*runs[name, precision])
            measured = [rest[k] / num_params for k in STATES]
            formula = theory.state_bytes_per_param(name, precision)
            cells += [" + ".join(f"{m:g}" for m in measured) + f" = **{sum(measured):g}**",
                      " + ".join(f"{f:g}" for f in formula) + f" = {sum(formula):g}"]
        rows.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    out["per_param_rows"] = "\n".join(rows)

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6), sharey=True, layout="constrained")
    for ax, precision, label in zip(axes, ("fp32", "bf16_mixed"), ("fp32 Adam", "bf16 mixed Adam")):
        plots.memory_bars([at_rest(*runs["adam", precision])],
                          predicted=theory.model_state_breakdown(num_params, "adam", precision),
                          unit="MB", ax=ax, title=f"{label}: measured (tracer) and formula")
    axes[0].get_legend().remove()
    out["bars_precision_figure"] = fig

    # fp16 and bf16
    out["finfo_rows"] = finfo_rows()
    out["underflow_rows"], out["exact_gradient"] = underflow_rows()

    # recomputation
    kept = {rc: traced_blocks(rc) for rc in (False, True)}
    formula_none = theory.layer_activation_bytes(S, B, H, A, value_bytes=4, dropout=False)
    formula_full = 2 * theory.transformer_activation_bytes(S, B, H, A, 1, recompute="full")
    out["block_setup"] = f"s = {S}, b = {B}, h = {H}, a = {A}, {BLOCKS} blocks, fp32, no dropout"
    out["rc_rows"] = "\n".join([
        f"| none | {kept[False][0] // BLOCKS:,} | {formula_none:,.0f} | {kept[False][1]:,} |",
        f"| full (`checkpoint`) | {kept[True][0] // BLOCKS:,} | {formula_full:,.0f} | {kept[True][1]:,} |",
    ])
    out["rc_ratio"] = f"{kept[True][0] / kept[False][0]:.3g}"
    out["layernorm_stats"] = f"{kept[False][0] // BLOCKS - formula_none:,.0f}"
    flops = step_flops()
    out["rc_extra_flops"] = f"{flops['recompute'] / flops['plain'] - 1:.0%}"
    out["forward_share"] = f"{flops['forward'] / flops['plain']:.0%}"

    # ZeRO: the stages executed on fake tensors, against the formula
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.8), sharey=True, layout="constrained")
    sims = {}
    for ax, stage in zip(axes, theory.ZERO_STAGES):
        sims[stage] = simulate.zero(PSI, world_size=N_D, stage=stage)
        name = f"ZeRO-{stage}" if stage else "DDP (stage 0)"
        plots.memory_bars([sims[stage].as_dict()],
                          predicted=theory.zero_memory_breakdown(PSI, N_D, stage), unit="GB",
                          ax=ax, title=(f"{name}\nsimulated {sims[stage].total / 1e9:.4g} GB\n"
                                        f"formula {theory.zero_memory(PSI, N_D, stage) / 1e9:.4g} GB"))
        ax.set_xticks([0, 1], ["simulated\nrank 0", "formula"])
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
        if stage:
            ax.set_ylabel("")
    keep = [i for i, n in enumerate(names) if not n.startswith("formula total")]
    axes[-1].legend([handles[i] for i in keep] + [handles[names.index(n)] for n in names
                                                  if n.startswith("formula total")][:1],
                    [names[i] for i in keep] + ["formula total"], fontsize="small",
                    loc="upper left", bbox_to_anchor=(1.0, 1.0))
    out["zero_bars_figure"] = fig
    out["psi"] = f"{PSI / 1e9:g} × 10<sup>9</sup>"
    out["n_d"] = str(N_D)

    # Table 1, the 7.5B column
    cells = {(c["world_size"], c["stage"]): c["paper_gb"] for c in theory.zero_table1()
             if c["model"] == "7.5B"}
    rows = []
    for n in theory.TABLE1_WORLD_SIZES:
        row = [f"| {n} | {theory.zero_memory(PSI, n, 0) / 1e9:g} "]
        for stage in (1, 2, 3):
            value = theory.zero_memory(PSI, n, stage) / 1e9
            printed = cells[n, stage]
            row.append(f"| {value:.6g} | {printed} ({theory.printed_match(value, printed)}) ")
        rows.append("".join(row) + "|")
    out["table1_rows"] = "\n".join(rows)
    out["table1_model"] = "7.5B"
    return out
