"""labkit.launch inside a real Jupyter kernel: notebook-defined functions, the stop button, a dying kernel."""
import re
import time

import nbformat
import psutil
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

CELLS = [
    "import labkit, torch, torch.distributed as dist",
    "SCALE = 10\ndef helper(x):\n    return x * SCALE",
    "def work():\n"
    "    t = torch.tensor([float(dist.get_rank())])\n"
    "    dist.all_reduce(t)\n"
    "    print('rank', dist.get_rank(), 'sum', t.item())\n"
    "    return helper(dist.get_rank()) + t.item()",
    "results = labkit.launch(work, nprocs=4)\nprint('RESULTS', results)",
    "def broken():\n"
    "    if dist.get_rank() == 1:\n"
    "        raise KeyError('missing-key-from-cell')\n"
    "    dist.barrier()\n"
    "try:\n"
    "    labkit.launch(broken, nprocs=2)\n"
    "except labkit.LaunchError as error:\n"
    "    print(error)",
]


def test_a_notebook_defined_function_runs_on_four_ranks():
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    text = ["".join(o.get("text", "") for o in cell.outputs) for cell in notebook.cells]
    for rank in range(4):
        assert f"[rank {rank}] rank {rank} sum 6.0\n" in text[3]
    assert "RESULTS [6.0, 16.0, 26.0, 36.0]" in text[3]
    banner, error = text[4].split("\n", 1)
    assert banner.startswith("labkit.launch: 2 rank(s)")
    assert error.startswith("ROOT CAUSE: rank 1 of 2: KeyError: 'missing-key-from-cell'")
    assert "raise KeyError('missing-key-from-cell')" in text[4]  # the cell's own source line


SLOW_CELL = ("import labkit, os, time\n"
             "def slow():\n"
             "    print('pid', os.getpid(), flush=True)\n"
             "    time.sleep(120)\n"
             "labkit.launch(slow, nprocs=2, timeout=300)")


@pytest.fixture
def kernel():
    manager, client = start_new_kernel(kernel_name="python3")
    yield manager, client
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


def _rank_pids(client, count, timeout=60):
    pids, deadline = [], time.monotonic() + timeout
    while len(pids) < count:
        message = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if message["msg_type"] == "stream":
            pids += [int(p) for p in re.findall(r"\] pid (\d+)", message["content"]["text"])]
    return pids


def _all_gone(pids, wait_s):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_the_stop_button_stops_every_rank_and_raises_keyboard_interrupt(kernel):
    manager, client = kernel
    msg_id = client.execute(SLOW_CELL)
    pids = _rank_pids(client, 2)
    manager.interrupt_kernel()
    reply = client.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert _all_gone(pids, 5), "ranks survived the interrupt"
    # the kernel is fine afterwards and can launch again
    client.execute_interactive("print(labkit.launch(lambda: 7, nprocs=2, quiet=True))",
                               timeout=60, output_hook=lambda m: None)


def test_ranks_exit_on_their_own_when_the_kernel_dies(kernel):
    manager, client = kernel
    client.execute(SLOW_CELL)
    pids = _rank_pids(client, 2)
    kernel_process = psutil.Process(manager.provisioner.process.pid)
    server = [p.pid for p in kernel_process.children()
              if "labkit.launcher._forkserver" in " ".join(p.cmdline())]
    kernel_process.kill()  # SIGKILL: no atexit, no cleanup of any kind in the kernel
    assert server, "the kernel should have a fork server"
    assert _all_gone(pids + server, 10), "ranks or the fork server outlived the kernel"
