"""The README's examples run and say what they claim."""
import os
import re

import matplotlib

matplotlib.use("Agg")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_the_launch_example_returns_what_its_comment_says():
    block = python_blocks()[0]
    call, comment = re.search(r"^(labkit\.launch\(.*\))\s*# -> (.*)$", block, re.M).groups()
    namespace = {}
    exec(block.replace(call, f"result = {call}"), namespace)
    assert namespace["result"] == eval(comment)


def test_the_measuring_example_traces_ddp_memory_and_communication():
    namespace = {}
    exec(python_blocks()[1], namespace)
    psi = 1024 * 1025
    for memory, communication in namespace["reports"]:
        assert memory["peak"]["params"] == memory["peak"]["grads"] == 4 * psi
        assert memory["peak"]["comm"] == 4 * psi  # the tagged DDP bucket
        assert communication["all_reduce"]["payload_bytes"] == 4 * psi
