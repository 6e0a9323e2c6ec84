"""The graders on a GPU: what they hand to the learner's code inside a rank lives on the rank's
device (``labkit.device()``), and a crash from tensors on two devices gets advice that says so.

No GPU is needed. The rank-side helpers run in this process with the rank's device set to
``meta`` (``LABKIT_RANK_DEVICE``, as the launcher sets it): every tensor they hand on must be a
meta tensor, and any op of theirs that mixes a CPU tensor with one would raise. An AST lint over
``labkit/check/*.py`` keeps tensors the graders create inside ranks placed. The same checks on a
real GPU are the graders' own tests, run on a machine that has one.
"""
import ast
import io
import itertools
import tokenize
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.check import _allreduce, _core, _sharded, _training, nb01_async
from labkit.check import nb04_accumulation as nb04
from labkit.placement import RANK_DEVICE_VARIABLE

CHECK_DIR = Path(_core.__file__).parent


# --- the advice for a crash from tensors on two devices -------------------------------------------

DEVICE_MESSAGES = [
    "No backend type associated with device type cpu",
    "Tensors must be CUDA and dense",
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
    "cpu! (when checking argument for argument mat2 in method wrapper_CUDA_mm)",
]


def _fail_with(monkeypatch, message, crash_advice=None, case="a tensor of 12 elements"):
    """The hint ``Ranks`` gives when rank 1's learner code raised ``message``, from a fabricated
    ``LaunchError`` (no ranks are started)."""
    monkeypatch.setattr(_core, "_wait_for_fork_server", lambda: None)

    def launch(*args, **kwargs):
        raise labkit.LaunchError("rank 1 failed", rank=1, failures={1: {
            "type": "LearnerCrash", "message": f"{case} :: RuntimeError: {message}",
            "traceback": "", "time": 0.0}})
    monkeypatch.setattr(labkit, "launch", launch)
    ranks = _core.Ranks("ring_all_reduce", crash_advice=crash_advice)
    with pytest.raises(_core.Failed) as failed:
        ranks.run(print, 2)
    return failed.value.hint


@pytest.mark.parametrize("message", DEVICE_MESSAGES)
def test_a_crash_from_tensors_on_two_devices_says_where_to_make_buffers(monkeypatch, message):
    hint = _fail_with(monkeypatch, message)
    assert hint.startswith("ring_all_reduce raised RuntimeError on rank 1 of 2 with a tensor of "
                           "12 elements")
    assert hint.endswith(_core.DEVICE_ADVICE)
    assert "device=p.device" in hint and "zeros_like" in hint and "new_zeros" in hint


def test_the_device_advice_comes_instead_of_the_graders_own(monkeypatch):
    """A grader's advice reads sizes and dtypes into a crash; for a device mismatch that would
    send the learner after the wrong bug."""
    def size_advice(crash):
        return "7 elements do not split evenly over 2 ranks"
    hint = _fail_with(monkeypatch, DEVICE_MESSAGES[0], crash_advice=size_advice,
                      case="a tensor of 7 elements")
    assert hint.endswith(_core.DEVICE_ADVICE) and "split evenly" not in hint


def test_other_crashes_get_no_device_advice(monkeypatch):
    hint = _fail_with(monkeypatch, "The size of tensor a (4) must match the size of tensor b (3)")
    assert _core.DEVICE_ADVICE not in hint and "device" not in hint
    crash = _core.Crash(0, 2, "", "RuntimeError", "shape mismatch", None)
    assert _core.device_advice(crash) is None


# --- the rank-side helpers put what they hand on on the rank's device -----------------------------

@pytest.fixture
def on_meta(monkeypatch):
    """This process as a rank whose device is ``meta``."""
    monkeypatch.setenv(RANK_DEVICE_VARIABLE, "meta")
    assert labkit.device() == torch.device("meta")


@pytest.fixture
def rank0_of_1(monkeypatch):
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)


def _devices(value) -> set:
    if isinstance(value, torch.Tensor):
        return {value.device.type}
    if isinstance(value, torch.nn.Module):
        return {t.device.type for t in itertools.chain(value.parameters(), value.buffers())}
    if isinstance(value, dict):
        return set().union(set(), *map(_devices, value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(set(), *map(_devices, value))
    return set()


def test_the_all_reduce_cases_reach_the_learner_on_the_ranks_device(on_meta, rank0_of_1):
    seen = []

    def fn(tensor):
        seen.append(tensor.device.type)
        tensor.add_(1)
    stacks = _allreduce.fresh_inputs(1, _allreduce.RING_CASES)
    labels = [case.label for case in _allreduce.RING_CASES]
    results = _allreduce.run_cases(fn, stacks, labels)
    assert seen == ["meta"] * len(labels)
    assert _devices([r["output"] for r in results]) == {"meta"}


def test_the_async_tensors_reach_the_learner_on_the_ranks_device(on_meta, rank0_of_1, tmp_path):
    seen = []

    def fn(tensors, compute):
        seen.extend(t.device.type for t in tensors)
        return compute()
    result = nb01_async._run(fn, nb01_async.fresh_inputs(1, nb01_async.SIZES), str(tmp_path))
    assert seen == ["meta"] * len(nb01_async.SIZES) and result["returned"]


class _Wrapper(torch.nn.Module):
    """A DDP wrapper that communicates nothing, with every method the graders call."""

    def __init__(self, module, *args):
        super().__init__()
        self.module = module
        self.seen = _devices(module)

    def forward(self, x):
        self.seen |= _devices(x)
        return self.module(x)

    def sync_gradients(self):
        self.seen |= {p.grad.device.type for p in self.module.parameters() if p.grad is not None}

    finish_gradient_sync = sync_gradients

    def no_sync(self):
        import contextlib
        return contextlib.nullcontext()


# the unused branch's forward asks a tensor for its value (bool(gate.any())): not on meta
KINDS = ("plain", "batchnorm", "frozen", "tied")


@pytest.mark.parametrize("kind", KINDS)
def test_the_ddp_graders_train_on_the_ranks_device(on_meta, kind, tmp_path):
    built = []

    def wrapper(model):
        built.append(_Wrapper(model))
        return built[-1]
    generator = torch.Generator().manual_seed(0)
    run = _training.fresh_run(kind, 2, torch.float32, generator)
    out = _training._train(wrapper, run, "sync_gradients", tmp_path / "rank1", 1, 2, "W")
    assert out["problem"] is None and built[0].seen == {"meta"}
    assert _devices(out["final"]) == {"meta"}

    built.clear()
    run = _training.fresh_run(kind, 2, torch.float64, generator, local_batch=nb04.K * 2)
    out = nb04._train_one(wrapper, run, nb04.K, tmp_path / "rank0", 0, 2)
    assert out["problem"] is None and built[0].seen == {"meta"}


class _Local:
    """A 'sharded' optimizer that shards nothing and communicates nothing."""

    def __init__(self, params, optimizer_class, bucket_bytes=None, **kwargs):
        self.params = params
        self.seen = _devices(params)
        self.optim = optimizer_class(params, **kwargs)

    def step(self):
        self.seen |= {p.grad.device.type for p in self.params}
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class _LocalModule(torch.nn.Module):
    """The same as a ZeRO-3 module wrapper."""

    def __init__(self, model, optimizer_class, prefetch=False, **kwargs):
        super().__init__()
        self.module, self.seen = model, _devices(model)
        self.optim = optimizer_class(model.parameters(), **kwargs)

    def forward(self, x):
        self.seen |= _devices(x)
        return self.module(x)

    def step(self):
        self.optim.step()

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=True)

    def full_state_dict(self):
        return dict(self.module.named_parameters())


def test_the_zero_graders_train_on_the_ranks_device(on_meta, tmp_path):
    assert _sharded._traced_device() == "meta"
    made = []

    def local(*args, **kwargs):
        made.append(_Local(*args, **kwargs))
        return made[-1]
    generator = torch.Generator().manual_seed(0)
    for optimizer in ("SGD", "Adam"):
        run = _sharded.fresh_run(_sharded.SMALL, 2, torch.float32, optimizer, generator,
                                 bucket_bytes=64)
        out = _sharded._train(local, 0, run, tmp_path / "rank0", 0, 2, "Local")
        assert out["problem"] is None and made[-1].seen == {"meta"}
        assert _devices(out["final"]) == {"meta"}

    def module(*args, **kwargs):
        made.append(_LocalModule(*args, **kwargs))
        return made[-1]
    run = _sharded.fresh_run(_sharded.UNITS, 2, torch.float32, "SGD", generator)
    out = _sharded._train_module(module, 0, run, tmp_path / "rank1", 1, 2, "Local", False)
    assert out["problem"] is None and made[-1].seen == {"meta"}
    assert _devices(out["final"]) == {"meta"}


def test_on_the_cpu_the_memory_tracers_count_every_device_as_before(monkeypatch):
    monkeypatch.delenv(RANK_DEVICE_VARIABLE, raising=False)
    assert _sharded._traced_device() is None
    monkeypatch.setenv(RANK_DEVICE_VARIABLE, "cpu")
    assert _sharded._traced_device() is None
    monkeypatch.setenv(RANK_DEVICE_VARIABLE, "cuda:1")
    assert _sharded._traced_device() == "cuda"


# --- the lint: tensors created inside ranks are placed --------------------------------------------

FACTORIES = {"zeros", "empty", "ones", "full", "arange", "tensor", "randn", "rand", "randint",
             "linspace", "eye"}
CPU_MARK = "# cpu:"


class _Module:
    def __init__(self, name, source):
        self.name, self.tree = name, ast.parse(source)
        self.comments = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                self.comments[token.start[0]] = token.string
        self.defs = {node.name: node for node in self.tree.body
                     if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        self.modules, self.names = {}, {}   # alias -> module; alias -> (module, name)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    self.names[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.modules[alias.asname] = alias.name


def _resolve(modules, here, expr):
    """(module, top-level name) that ``expr`` names among ``modules``, or None."""
    if isinstance(expr, ast.Name):
        if expr.id in here.defs:
            return here.name, expr.id
        module, name = here.names.get(expr.id, (None, None))
        if module in modules and name in modules[module].defs:
            return module, name
    elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        module = here.modules.get(expr.value.id)
        if module in modules and expr.attr in modules[module].defs:
            return module, expr.attr
    return None


def _params(function):
    return [a.arg for a in function.args.posonlyargs + function.args.args]


def _functions(modules):
    """(module, the top-level function) for every function, every method too."""
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, node


def _launched(modules) -> set:
    """What runs in ranks: the first argument of every ``<ranks>.run(worker, ...)`` call, and
    what a function that forwards one of its parameters there is called with, anywhere."""
    entries, forwards = set(), {}   # forwards: (module, function) -> index of the parameter
    for module, function in _functions(modules):
        for call in ast.walk(function):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                    and call.func.attr == "run" and call.args:
                target = _resolve(modules, module, call.args[0])
                if target:
                    entries.add(target)
                elif isinstance(call.args[0], ast.Name) and call.args[0].id in _params(function):
                    forwards[module.name, function.name] = _params(function).index(
                        call.args[0].id)
    changed = True
    while changed:
        changed = False
        for module, function in _functions(modules):
            for call in ast.walk(function):
                if not isinstance(call, ast.Call):
                    continue
                callee = _resolve(modules, module, call.func)
                if callee not in forwards or len(call.args) <= forwards[callee]:
                    continue
                passed = call.args[forwards[callee]]
                target = _resolve(modules, module, passed)
                if target and target not in entries:
                    entries.add(target)
                    changed = True
                elif isinstance(passed, ast.Name) and passed.id in _params(function) \
                        and (module.name, function.name) not in forwards:
                    forwards[module.name, function.name] = _params(function).index(passed.id)
                    changed = True
    return entries


def _in_ranks(modules) -> set:
    """The launched functions and everything they name, transitively, among ``modules``
    (a class named: all its methods)."""
    reached, queue = set(), list(_launched(modules))
    while queue:
        key = queue.pop()
        if key in reached:
            continue
        reached.add(key)
        module = modules[key[0]]
        for node in ast.walk(module.defs[key[1]]):
            if isinstance(node, (ast.Name, ast.Attribute)):
                target = _resolve(modules, module, node)
                if target and target not in reached:
                    queue.append(target)
    return reached


def unplaced_tensors(sources: dict) -> list:
    """``module:line: torch.<factory>(...)`` for every tensor factory call in code that runs in
    ranks without ``device=``, without ``generator=`` and without a ``# cpu: <why>`` comment on
    its lines.

    ``sources``: module name -> source text. What runs in ranks: the functions passed to
    ``<anything>.run(worker, ...)`` (``Ranks.run``), also through a parameter of a function that
    forwards it there (``_sharded.train_everywhere``), and every top-level function or class
    they name, followed across the given modules (imports of ``from labkit.check import x`` and
    ``from labkit.check.x import y`` are resolved; code outside ``sources``, e.g.
    ``labkit.models``, is not looked into). Factories: ``torch.zeros/empty/ones/full/arange/
    tensor/randn/rand/randint/linspace/eye`` called as ``torch.<name>``; ``*_like`` and
    ``t.new_*`` take their tensor's device and are fine. A call with ``generator=`` counts as a
    seeded CPU draw: that it is moved afterwards is not verified. Following every name a rank
    function mentions over-approximates what runs there; a false alarm takes a ``# cpu:``
    comment that says why.
    """
    modules = {name: _Module(name, source) for name, source in sources.items()}
    found = []
    for module_name, name in sorted(_in_ranks(modules)):
        module = modules[module_name]
        for call in ast.walk(module.defs[name]):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                    and call.func.attr in FACTORIES):
                continue
            if any(k.arg in ("device", "generator") for k in call.keywords):
                continue
            lines = range(call.lineno, (call.end_lineno or call.lineno) + 1)
            if any(module.comments.get(line, "").startswith(CPU_MARK) for line in lines):
                continue
            found.append(f"{module_name}:{call.lineno}: torch.{call.func.attr}(...) in "
                         f"{name}")
    return found


def _check_sources() -> dict:
    return {f"labkit.check.{path.stem}": path.read_text()
            for path in sorted(CHECK_DIR.glob("*.py"))}


def test_tensors_made_inside_ranks_are_placed():
    sources = _check_sources()
    assert unplaced_tensors(sources) == []


def test_the_lint_sees_every_function_the_checks_launch():
    modules = {name: _Module(name, source) for name, source in _check_sources().items()}
    launched = _launched(modules)
    for key in [("labkit.check._allreduce", "run_cases"), ("labkit.check.nb00_setup", "_run"),
                ("labkit.check.nb01_async", "_run"),
                ("labkit.check._training", "train_on_rank"),
                ("labkit.check.nb03_buckets", "_train"),
                ("labkit.check.nb04_accumulation", "_train_sync"),
                ("labkit.check.nb04_accumulation", "_token_rank"),
                ("labkit.check._sharded", "train_on_rank"),           # through train_everywhere
                ("labkit.check._sharded", "train_module_on_rank")]:
        assert key in launched, key
    reached = _in_ranks(modules)
    for key in [("labkit.check._sharded", "_train"), ("labkit.check._sharded", "_step"),
                ("labkit.check._training", "_train"), ("labkit.check.nb03_buckets", "_Proxy"),
                ("labkit.check.nb04_accumulation", "ReferenceDDP"),
                ("labkit.check.nb04_accumulation", "_train_one")]:
        assert key in reached, key


PLANTED = '''
import torch
from labkit.check import helpers


def _buffer(n):
    return torch.zeros(3)


def _worker(fn, x):
    return fn(x + _buffer(3))


def _other(fn):
    return helpers.work(fn)


def _placed(fn, x):
    a = torch.zeros(3, device=x.device)
    b = torch.randn(3, generator=torch.Generator().manual_seed(0)).to(x.device)
    c = torch.arange(4)   # cpu: only its length is read
    return fn(a + b), len(c)


def _forward(ranks, worker, fn):
    return ranks.run(worker, 2, fn)


def grade(fn):
    ranks.run(_worker, 2, fn)
    ranks.run(_placed, 2, fn)
    _forward(ranks, _other, fn)
    return torch.ones(5)   # the notebook's own tensor: not in a rank
'''

HELPERS = '''
import torch


def work(fn):
    return fn(torch.empty(4, dtype=torch.float64))
'''


def test_the_lint_finds_a_planted_unplaced_tensor():
    found = unplaced_tensors({"labkit.check.planted": PLANTED, "labkit.check.helpers": HELPERS})
    assert found == ["labkit.check.helpers:6: torch.empty(...) in work",
                     "labkit.check.planted:7: torch.zeros(...) in _buffer"]
    placed = PLANTED.replace("torch.zeros(3)", "torch.zeros(3, device=labkit.device())")
    marked = HELPERS.replace("torch.float64))", "torch.float64))   # cpu: a test of the lint")
    assert unplaced_tensors({"labkit.check.planted": placed,
                             "labkit.check.helpers": marked}) == []
    # the notebook's own tensors are not the lint's business; a rank's are, wherever they are
    assert unplaced_tensors({"labkit.check.planted": PLANTED.replace("ranks.run", "print")}) == []
