"""Every accelerate config in recipes/accelerate is what its name says, as accelerate itself reads it: loaded by
accelerate's config loader (which refuses unknown keys), and resolved by `accelerate launch`'s own argument
handling into the launcher and per-machine process count it would start, without starting anything."""

from __future__ import annotations

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "recipes", "accelerate")

# file -> (distributed_type, num_processes over all machines, num_machines, mixed_precision, use_cpu, launcher)
# launcher: what `accelerate launch` starts the processes with: "torchrun" (MULTI_GPU and FSDP configs) or
# "deepspeed" (DEEPSPEED configs; it runs torchrun too on one machine). Never "simple": accelerate's simple launcher
# starts one process whatever num_processes says (a MULTI_CPU config without mpirun).
EXPECTED = {
    "cpu2.yaml": ("MULTI_GPU", 2, 1, "no", True, "torchrun"),
    "ddp.yaml": ("MULTI_GPU", 2, 1, "bf16", False, "torchrun"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2, 1, "bf16", False, "deepspeed"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 2, 1, "bf16", False, "deepspeed"),
    "fsdp.yaml": ("FSDP", 2, 1, "bf16", False, "torchrun"),
    "fsdp_cpu.yaml": ("FSDP", 2, 1, "no", True, "torchrun"),
    "multinode.yaml": ("MULTI_GPU", 16, 2, "bf16", False, "torchrun"),
}
FSDP = {  # fsdp_config entries that matter to align (FULL_STATE_DICT: gathered_state saves the whole model)
    "fsdp.yaml": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                  "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True,
                  "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": True},
    "fsdp_cpu.yaml": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True,
                      "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": False},
}
DEEPSPEED = {  # align accumulates micro-batches itself (gradient_accumulation_steps 1); ZeRO-3 must gather the
    # 16-bit weights on save, or get_state_dict refuses and the final model cannot be written
    "deepspeed_zero2.yaml": {"zero_stage": 2, "gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
                             "offload_param_device": "none"},
    "deepspeed_zero3.yaml": {"zero_stage": 3, "gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
                             "offload_param_device": "none", "zero3_init_flag": True,
                             "zero3_save_16bit_model": True},
}
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(os.path.join(CONFIG_DIR, name))


def launch_plan(name: str, *extra: str):
    """(launcher, the parsed launch arguments after accelerate filled them, the environment of the processes) for
    `accelerate launch --config_file NAME EXTRA -m align.cli sft` (NAME: a file of recipes/accelerate, or a path),
    as accelerate's launch command works them out, without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIG_DIR, name), *extra,
                                               "-m", "align.cli", "sft"])
    args, defaults, _ = _validate_launch_command(args)
    # the dispatch of accelerate.commands.launch.launch_command (tpu, megatron and sagemaker aside)
    if args.use_deepspeed and not args.cpu:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        return "deepspeed", args, env
    if (args.use_fsdp or args.multi_gpu) and not args.cpu:
        return "torchrun", args, prepare_multi_gpu_env(args)
    return "simple", args, None


def test_every_config_is_described():
    assert CONFIGS, CONFIG_DIR
    assert set(CONFIGS) == set(EXPECTED), "describe each recipes/accelerate/*.yaml in EXPECTED (and FSDP/DEEPSPEED)"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_as_accelerate_loads_it(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    cfg = load(name)  # raises on a key accelerate does not know
    dtype, nproc, machines, mixed, cpu, _ = EXPECTED[name]
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == DistributedType(dtype)
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (nproc, machines, 0)
    assert nproc % machines == 0 and nproc // machines >= 1
    assert cfg.mixed_precision == mixed
    assert cfg.use_cpu is cpu
    if name.startswith("fsdp"):
        assert {k: cfg.fsdp_config.get(k) for k in FSDP[name]} == FSDP[name]
    else:
        assert cfg.fsdp_config == {}
    if name.startswith("deepspeed"):
        assert {k: cfg.deepspeed_config.get(k) for k in DEEPSPEED[name]} == DEEPSPEED[name]
    else:
        assert cfg.deepspeed_config == {}


@pytest.mark.parametrize("name", [n for n in CONFIGS if EXPECTED[n][2] == 1])
def test_single_machine_launch_starts_every_process(name):
    dtype, nproc, _, mixed, _, launcher = EXPECTED[name]
    kind, args, env = launch_plan(name, "--main_process_port", "0")
    assert kind == launcher
    assert int(args.nproc_per_node) == nproc  # torchrun starts this many processes
    assert getattr(args, "nnodes", None) is None
    assert env["ACCELERATE_MIXED_PRECISION"] == mixed
    if dtype == "FSDP":
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_VERSION"] == "2"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == str(FSDP[name]["fsdp_cpu_ram_efficient_loading"]).lower()
    else:
        assert "ACCELERATE_USE_FSDP" not in env
    if dtype == "DEEPSPEED":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(DEEPSPEED[name]["zero_stage"])
        if DEEPSPEED[name]["zero_stage"] == 3:
            assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    else:
        assert "ACCELERATE_USE_DEEPSPEED" not in env


def test_multinode_launch_joins_machine_0():
    """What machine 1 runs: torchrun with 2 nodes, 8 processes on this one, node rank 1, and a static rendezvous at
    machine 0's address and the config's port (the commands in the file's comment)."""
    kind, args, env = launch_plan("multinode.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert kind == "torchrun"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_backend == "static"
    assert args.rdzv_endpoint == "10.1.2.3:29500"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    with open(os.path.join(CONFIG_DIR, "multinode.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    for rank in (0, 1):
        assert (f"accelerate launch --config_file recipes/accelerate/multinode.yaml --machine_rank {rank} "
                f"--main_process_ip HOST --main_process_port 29500 -m align.cli <stage> --config") in text


def test_multi_cpu_config_would_start_one_process(tmp_path):
    """Why cpu2.yaml is a MULTI_GPU config: accelerate starts a MULTI_CPU config (without mpirun) with its simple
    launcher: one `python -m align.cli` and no RANK / WORLD_SIZE, a process that trains alone whatever
    num_processes says. If accelerate ever starts num_processes processes for it, cpu2.yaml can be MULTI_CPU."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    with open(os.path.join(CONFIG_DIR, "cpu2.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    assert "distributed_type: MULTI_GPU\n" in text
    path = tmp_path / "multi_cpu.yaml"
    path.write_text(text.replace("distributed_type: MULTI_GPU\n", "distributed_type: MULTI_CPU\n"))
    kind, args, _ = launch_plan(str(path), "--main_process_port", "0")
    assert kind == "simple" and args.num_processes == 2
    cmd, env = prepare_simple_launcher_cmd_env(args)
    assert cmd[1:] == ["-m", "align.cli", "sft"]  # one interpreter, no process starter in front
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert env.get(key) == os.environ.get(key)  # the launcher sets none of them
