"""launch.env on recorded environments: torchrun, srun alone, plain, array jobs, hostlists."""

from __future__ import annotations

import pytest

from launch.env import (
    PORT_BASE,
    PORT_SPAN,
    expand_hostlist,
    port_from_job_id,
    read_array_task,
    read_env,
    rendezvous_endpoint,
    slurm_nodes,
    task_slice,
)

# Recorded on the throw-away test cluster (two slurmd "nodes" n1, n2 on one host): rank 1 of a
# 2-node x 1-process job from launch.slurm (one srun task per node, each running torchrun).
# Variables not read by launch.env (SLURM_CONF, ports of srun, ...) are left out.
TORCHRUN_UNDER_SRUN_RANK1 = {
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "33909",
    "RANK": "1",
    "ROLE_NAME": "default",
    "ROLE_RANK": "1",
    "ROLE_WORLD_SIZE": "2",
    "SLURMD_NODENAME": "n2",
    "SLURM_CPUS_ON_NODE": "1",
    "SLURM_JOBID": "2",
    "SLURM_JOB_ID": "2",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "n[1-2]",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_RUN_ID": "2",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "WORLD_SIZE": "2",
}

# srun with one task per GPU (no torchrun): 4 nodes x 8 GPUs, task 13 sits on node 1 as local 5.
SRUN_ONLY_RANK13 = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[001-003,010]",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "13",
    "SLURM_LOCALID": "5",
    "SLURM_NTASKS": "32",
    "SLURM_TASKS_PER_NODE": "8(x4)",
    "SLURM_GPUS_ON_NODE": "8",
}


def test_torchrun_variables_win_over_slurm_ones():
    env = read_env(TORCHRUN_UNDER_SRUN_RANK1)
    assert env.launcher == "torchrun"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 0, 1)
    assert (env.node_rank, env.num_nodes) == (1, 2)
    assert (env.master_addr, env.master_port) == ("localhost", 33909)
    assert env.job_id == "2"
    assert env.nodes == ("n1", "n2")
    assert env.node_name == "n2"
    assert env.restart_count == 0
    assert env.elastic_restart_count == 0
    requeued = read_env({**TORCHRUN_UNDER_SRUN_RANK1, "SLURM_RESTART_COUNT": "1"})
    assert requeued.restart_count == 1


def test_torchrun_single_node_without_group_variables():
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.node_rank, env.num_nodes, env.master_port) == (3, 0, 1, 29500)
    assert env.nodes == () and env.job_id is None


def test_srun_only_multi_node():
    env = read_env(SRUN_ONLY_RANK13)
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (13, 32, 5, 8)
    assert (env.node_rank, env.num_nodes) == (1, 4)
    assert env.nodes == ("gpu001", "gpu002", "gpu003", "gpu010")
    assert env.master_addr == "gpu001"
    assert env.master_port == port_from_job_id("123456") == PORT_BASE + 123456 % PORT_SPAN
    assert env.gpus_on_node == 8
    assert env.restart_count == 0


def test_srun_uneven_tasks_per_node():
    env = read_env(
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NODELIST": "a[01-03]-ib,b7",
            "SLURM_NNODES": "4",
            "SLURM_NODEID": "3",
            "SLURM_PROCID": "9",
            "SLURM_LOCALID": "0",
            "SLURM_NTASKS": "10",
            "SLURM_TASKS_PER_NODE": "3(x3),1",
        }
    )
    assert env.local_world_size == 1
    assert env.nodes == ("a01-ib", "a02-ib", "a03-ib", "b7")


def test_master_port_variable_overrides_the_derived_port():
    env = read_env({**SRUN_ONLY_RANK13, "MASTER_PORT": "12345", "MASTER_ADDR": "10.0.0.1"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 12345)


def test_plain_process():
    env = read_env({})
    assert env.launcher == "none"
    assert (env.rank, env.world_size, env.node_rank, env.num_nodes) == (0, 1, 0, 1)


def test_port_is_deterministic_and_in_range():
    assert port_from_job_id("20007") == port_from_job_id("20007") == 20007
    for job in ("0", "1", "9999", "10000", "987654321"):
        assert PORT_BASE <= port_from_job_id(job) < PORT_BASE + PORT_SPAN


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("n[1-2],login1", ["n1", "n2", "login1"]),
        ("a[01-03]-ib,b7", ["a01-ib", "a02-ib", "a03-ib", "b7"]),
        ("node7", ["node7"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x[3],y[1,4-5]", ["x3", "y1", "y4", "y5"]),
    ],
)
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "SLURM_JOB_NODELIST ('') must name at least one node"),
        ("gpu[1-4", "SLURM_JOB_NODELIST ('gpu[1-4') has a '[' without a ']'"),
        ("gpu1-4]", "SLURM_JOB_NODELIST ('gpu1-4]') has a ']' without a '['"),
        ("gpu[4-1]", "SLURM_JOB_NODELIST ('gpu[4-1]'): range '4-1' must not descend"),
        (
            "gpu[a-b]",
            "SLURM_JOB_NODELIST ('gpu[a-b]'): range 'a-b' must be digits or digits-digits",
        ),
        ("n1,,n2", "SLURM_JOB_NODELIST ('n1,,n2') has an empty host name between commas"),
        ("n[1-2[3]]", "SLURM_JOB_NODELIST ('n[1-2[3]]') must not nest brackets"),
    ],
)
def test_malformed_hostlists_name_variable_value_and_rule(spec, message):
    with pytest.raises(ValueError) as err:
        expand_hostlist(spec)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"RANK": "2"}, "RANK (2) must be < WORLD_SIZE (2)"),
        ({"RANK": "x"}, "RANK ('x') must be an integer"),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK (1) must be < LOCAL_WORLD_SIZE (1)"),
        ({"GROUP_RANK": "2"}, "GROUP_RANK (2) must be < GROUP_WORLD_SIZE (2)"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE ('0') must be >= 1"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT (70000) must be <= 65535"),
        (
            {"SLURM_NNODES": "3", "SLURM_JOB_NUM_NODES": "3"},
            "SLURM_JOB_NODELIST ('n[1-2]') names 2 nodes but SLURM_NNODES is 3",
        ),
        ({"SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT ('-1') must be >= 0"),
    ],
)
def test_inconsistent_torchrun_variables(changes, message):
    with pytest.raises(ValueError) as err:
        read_env({**TORCHRUN_UNDER_SRUN_RANK1, **changes})
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SLURM_PROCID": "32"}, "SLURM_PROCID (32) must be < SLURM_NTASKS (32)"),
        ({"SLURM_NODEID": "4"}, "SLURM_NODEID (4) must be < SLURM_NNODES (4)"),
        ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID (8) must be < tasks on this node (8)"),
        ({"SLURM_TASKS_PER_NODE": "8x4"}, "SLURM_TASKS_PER_NODE ('8x4') must look like '4(x2),3'"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID ('abc') must be an integer"),
    ],
)
def test_inconsistent_srun_variables(changes, message):
    with pytest.raises(ValueError) as err:
        read_env({**SRUN_ONLY_RANK13, **changes})
    assert str(err.value) == message


def test_slurm_nodelist_fallback_variable():
    assert slurm_nodes({"SLURM_NODELIST": "c[1-2]"}) == ("c1", "c2")
    assert slurm_nodes({}) == ()


ARRAY_TASK_2_OF_4 = {
    "SLURM_ARRAY_JOB_ID": "40",
    "SLURM_ARRAY_TASK_ID": "2",
    "SLURM_ARRAY_TASK_MIN": "0",
    "SLURM_ARRAY_TASK_MAX": "3",
    "SLURM_ARRAY_TASK_COUNT": "4",
    "SLURM_ARRAY_TASK_STEP": "1",
    "SLURM_JOB_ID": "42",
}


def test_array_task():
    task = read_array_task(ARRAY_TASK_2_OF_4)
    assert task is not None
    assert (task.index, task.count, task.task_id, task.array_job_id) == (2, 4, 2, "40")
    shifted = read_array_task(
        {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "6"}
    )
    assert shifted is not None and (shifted.index, shifted.count) == (1, 3)
    assert read_array_task({}) is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"SLURM_ARRAY_TASK_ID": "7"},
            "SLURM_ARRAY_TASK_ID (7) must be within SLURM_ARRAY_TASK_MIN (0) and "
            "SLURM_ARRAY_TASK_MAX (3)",
        ),
        ({"SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_STEP (2) must be 1 (use --array=0-N)"),
        (
            {"SLURM_ARRAY_TASK_COUNT": "3"},
            "SLURM_ARRAY_TASK_COUNT (3) must equal SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN "
            "+ 1 (4); the array must be contiguous",
        ),
    ],
)
def test_bad_array_variables(changes, message):
    with pytest.raises(ValueError) as err:
        read_array_task({**ARRAY_TASK_2_OF_4, **changes})
    assert str(err.value) == message


def test_task_slices_partition_the_items():
    items = list(range(10))
    slices = [task_slice(items, index=i, count=3) for i in range(3)]
    assert slices == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(x for s in slices for x in s) == items
    assert task_slice(items[:1], index=2, count=3) == []
    with pytest.raises(ValueError, match=r"array task index \(3\) must be in \[0, 3\)"):
        task_slice(items, index=3, count=3)


def test_rendezvous_endpoint_falls_back_to_the_resolvable_name():
    # No scontrol answers for "localhost" outside a cluster, and the name resolves.
    host, port = rendezvous_endpoint({"SLURM_JOB_ID": "20001", "SLURM_JOB_NODELIST": "localhost"})
    assert (host, port) == ("localhost", 20001)


def test_rendezvous_endpoint_outside_slurm():
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST \(unset\) must be set"):
        rendezvous_endpoint({})
