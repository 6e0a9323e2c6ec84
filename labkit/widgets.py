"""Interactive widgets for notebooks: the memory calculator.

Sliders for the model (a parameter count or a transformer's shape), the world size, the ZeRO
stage, the precision and the optimizer; the bars show model-state memory per rank by category
from ``labkit.theory``, and beside them the bytes a learner measured with ``labkit.MemoryTracer``.
"""
from labkit import theory
from labkit.plots import memory_bars

# Bytes per parameter: (param, grad, optimizer state K). Mixed-precision Adam is the ZeRO paper's
# (§3.1: fp16 params and grads, K = 12 for the fp32 master copy, momentum and variance). The
# others follow the same accounting: the fp32 master copy (mixed precision only) plus one fp32
# buffer per optimizer state (momentum for SGD with momentum, momentum + variance for Adam).
BYTES_PER_PARAM = {
    ("mixed", "Adam"): (2, 2, 12), ("mixed", "SGD + momentum"): (2, 2, 8), ("mixed", "SGD"): (2, 2, 4),
    ("fp32", "Adam"): (4, 4, 8), ("fp32", "SGD + momentum"): (4, 4, 4), ("fp32", "SGD"): (4, 4, 0),
}
PRECISIONS = ("mixed", "fp32")
OPTIMIZERS = ("Adam", "SGD + momentum", "SGD")
WORLD_SIZES = tuple(2**i for i in range(11))
# The parameter-count slider's stops, in billions: 1, 1.5, 2, 3, 5, 7.5 per decade from 1e6 to
# 1e12. A SelectionSlider lands exactly on them; a FloatLogSlider snaps to its exponent grid in
# the browser (7.5 B came back as 10^0.88 = 7.59 B) and sends that value to the kernel.
MANTISSAS = (1, 1.5, 2, 3, 5, 7.5)
BILLIONS = tuple(round(m * 10.0**e, 6) for e in range(-3, 3) for m in MANTISSAS) + (1000,)


def parameter_stops(billions: float) -> tuple:
    """The slider's stops with ``billions`` among them (a size off the grid is added, in order)."""
    stops = set(BILLIONS) | {billions}
    return tuple(sorted(stops))


def billions_label(billions: float) -> str:
    return f"{billions:g} B" if billions >= 1 else f"{billions * 1e3:g} M"


def model_state_bytes(num_params: float, world_size: int, stage: int, precision: str = "mixed",
                      optimizer: str = "Adam") -> dict:
    """{"params", "grads", "optimizer"} bytes per rank for this configuration (see BYTES_PER_PARAM)."""
    if (precision, optimizer) not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {PRECISIONS} and optimizer one of {OPTIMIZERS}")
    param_bytes, grad_bytes, k = BYTES_PER_PARAM[(precision, optimizer)]
    return theory.zero_memory_breakdown(num_params, world_size, stage, k=k,
                                        param_bytes=param_bytes, grad_bytes=grad_bytes)


class MemoryCalculator:
    """The calculator's state and drawing; ``memory_calculator()`` builds and returns one."""

    def __init__(self, measured=None, num_params=7.5e9, world_size=64, stage=0,
                 precision="mixed", optimizer="Adam"):
        import ipywidgets as w

        self.measured = measured
        style = {"description_width": "110px"}
        self.mode = w.ToggleButtons(options=["parameter count", "transformer shape"],
                                    description="model", style=style)
        billions = num_params / 1e9
        self.billions = w.SelectionSlider(
            options=[(billions_label(b), b) for b in parameter_stops(billions)], value=billions,
            description="parameters", style=style)
        self.layers = w.IntSlider(value=32, min=1, max=128, description="layers", style=style)
        self.hidden = w.IntSlider(value=4096, min=64, max=16384, step=64, description="hidden",
                                  style=style)
        self.vocab = w.IntText(value=50257, description="vocabulary", style=style)
        self.seq_len = w.IntText(value=2048, description="sequence length", style=style)
        self.world_size = w.SelectionSlider(options=WORLD_SIZES, value=world_size,
                                            description="world size", style=style)
        self.stage = w.ToggleButtons(options=[("DDP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2),
                                              ("ZeRO-3", 3)], value=stage, description="stage",
                                     style=style)
        self.precision = w.Dropdown(options=PRECISIONS, value=precision, description="precision",
                                    style=style)
        self.optimizer = w.Dropdown(options=OPTIMIZERS, value=optimizer, description="optimizer",
                                    style=style)
        self.output = w.Output()
        self.summary = w.HTML()
        controls = [self.mode, self.billions, self.layers, self.hidden, self.vocab, self.seq_len,
                    self.world_size, self.stage, self.precision, self.optimizer]
        for control in controls:
            control.observe(lambda _change: self.refresh(), names="value")
        self.widget = w.HBox([w.VBox(controls + [self.summary]), self.output])
        self.refresh()

    def num_params(self) -> float:
        if self.mode.value == "parameter count":
            return self.billions.value * 1e9
        return theory.transformer_params(layers=self.layers.value, hidden=self.hidden.value,
                                         vocab_size=self.vocab.value, seq_len=self.seq_len.value)

    def breakdown(self) -> dict:
        return model_state_bytes(self.num_params(), self.world_size.value, self.stage.value,
                                 self.precision.value, self.optimizer.value)

    def refresh(self) -> None:
        import matplotlib.pyplot as plt

        is_shape = self.mode.value == "transformer shape"
        self.billions.layout.display = "none" if is_shape else None
        for control in (self.layers, self.hidden, self.vocab, self.seq_len):
            control.layout.display = None if is_shape else "none"
        predicted = self.breakdown()
        total = sum(predicted.values())
        unit = "GB" if total >= 1e9 else "MB"
        self.summary.value = (f"<b>{self.num_params() / 1e9:.3g} B parameters</b>: "
                              f"{total / 1e9:.3g} GB of model states per rank "
                              f"({', '.join(f'{k} {v / 1e9:.3g}' for k, v in predicted.items())})")
        with self.output:
            self.output.clear_output(wait=True)
            figure, ax = plt.subplots(figsize=(6, 3.5))
            memory_bars(self.measured or [], predicted=predicted, unit=unit, ax=ax,
                        title="model states per rank" + (": measured and formula"
                                                         if self.measured else ""))
            plt.show()
            plt.close(figure)  # one figure per refresh: never let them pile up

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def memory_calculator(measured=None, **settings) -> MemoryCalculator:
    """Sliders for model size, world size, ZeRO stage, precision and optimizer, with the bars.

    measured: optional per-rank tracer reports (e.g. the list ``labkit.launch`` returned), drawn
    beside the formula's bar. settings: initial num_params, world_size, stage, precision,
    optimizer.
    """
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        raise ImportError("the memory calculator needs ipywidgets: pip install -e '.[lab]'") from None
    return MemoryCalculator(measured, **settings)
