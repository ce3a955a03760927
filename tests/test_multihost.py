"""Bulk sweeps on several devices and several processes give the one-process result:
4 virtual CPU devices in one process, and two processes under jax.distributed (gloo on
localhost) writing their own shards into one folder."""

import json
import os
import socket
import subprocess
import sys

import pytest

from jpatch.runs.bulk import bulk_sweep
from jpatch.runs.results import load_result
from test_bulk import REPO, SITES, assert_same, examples, subprocess_env, tiny_model, write_jsonl

TIMEOUT = 300
TOL = 1e-5  # a prompt batch split over devices may round differently in float32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", examples(7))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "one"
    bulk_sweep(tiny_model(), data, SITES, "str", "logit-diff", out, shard_size=4, progress=False)
    return load_result(out)


def run_children(commands, env):
    children = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for c in commands]
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=TIMEOUT)
            assert child.returncode == 0, f"child failed:\n{err[-3000:]}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs


CHILD = """
import json, sys
import jax
{setup}
from test_bulk import SITES, tiny_model
from jpatch.runs.bulk import bulk_sweep
run = bulk_sweep(tiny_model(), sys.argv[1], SITES, "str", "logit-diff", sys.argv[2], shard_size=4, progress=False)
print(json.dumps({{"devices": len(jax.local_devices()), "process": [run.process_index, run.process_count],
                  "computed": run.computed}}))
"""

DISTRIBUTED = """
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[4], num_processes=2, process_id=int(sys.argv[3]))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_devices_match_one(data, reference, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(setup=""))
    out = tmp_path / "four"
    env = subprocess_env(XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    (report,) = run_children([[sys.executable, str(script), str(data), str(out)]], env)
    assert report == {"devices": 4, "process": [0, 1], "computed": [0, 1]}
    result = load_result(out)
    for site in reference.sites:
        assert_same(result[site], reference[site], tol=TOL, what=site)


def test_two_processes_match_one(data, reference, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(setup=DISTRIBUTED))
    out = tmp_path / "two"
    port = str(free_port())
    reports = run_children([[sys.executable, str(script), str(data), str(out), str(i), port] for i in (0, 1)],
                           subprocess_env())
    assert [r["process"] for r in reports] == [[0, 2], [1, 2]]
    assert [r["computed"] for r in reports] == [[0], [1]], "each process writes only its own shards"
    result = load_result(out)
    assert result.settings == reference.settings
    for site in reference.sites:
        assert_same(result[site], reference[site], tol=TOL, what=site)
    assert (result.lengths == reference.lengths).all()
